"""The per-call record shared by the interceptors and the servicer through a context variable
(grpc.aio runs the interceptors and the handler of one call in one contextvars.Context)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from ..errors import GatewayError


@dataclass
class CallRecord:
    """What is known about the current RPC.

    Attributes:
        request_id: from `x-request-id` metadata or generated.
        method: full gRPC method name, e.g. "/llm_gateway.v1.LLMGatewayService/Chat".
        peer: the client's address.
        key_id / owner: the authenticated API key's id and owner ("" without auth).
        scope: what rate limits count against (key id, or the client address without auth).
        code / reason: the outcome ("OK" until an error is answered).
        error: the GatewayError answered, if any.
    """

    request_id: str
    method: str
    peer: str
    key_id: str = ""
    owner: str = ""
    scope: str = ""
    code: str = "OK"
    reason: str = ""
    error: GatewayError | None = None


current_call: ContextVar[CallRecord | None] = ContextVar("llm_gateway_call", default=None)
