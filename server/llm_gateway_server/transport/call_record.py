"""The per-RPC record shared by the interceptors and the servicer through a context variable
(grpc.aio runs the interceptors and the handler of one call in one contextvars.Context), and the
request id rule."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from ..outcome import CallOutcome
from ..tenancy.records import Tenant

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_from(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The client's `x-request-id` (1-128 chars of `[A-Za-z0-9._:-]`) or a new uuid4 hex id."""
    for key, value in metadata or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


@dataclass(slots=True)
class CallRecord:
    """What is known about the current RPC.

    Attributes:
        request_id: from `x-request-id` metadata or generated.
        method: full gRPC method name, e.g. "/llm_gateway.v1.LLMGatewayService/Chat".
        peer: the client's address.
        key_id / owner: the authenticated API key's id and owner ("" without auth).
        scope: what rate limits count against (key id, or the client address without auth).
        outcome: what the call came to (see `outcome.CallOutcome`).
        tenant: the key (and team) the call is for, as the key cache resolved it (None without
            auth).
        model / end_user_id: the model the request asks for and its `end_user_id` ("" when
            the request names none), for the usage ledger.
    """

    request_id: str
    method: str
    peer: str
    key_id: str = ""
    owner: str = ""
    scope: str = ""
    outcome: CallOutcome = field(default_factory=CallOutcome)
    tenant: Tenant | None = None
    model: str = ""
    end_user_id: str = ""


current_call: ContextVar[CallRecord | None] = ContextVar("llm_gateway_call", default=None)
