"""Authentication: `authorization: Bearer <key>` or `x-api-key: <key>` metadata, checked against
configured keys stored only as SHA-256 hashes (compared in constant time). Per key: expiry,
disabled flag and allowed model globs. The key itself is never logged or echoed."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import grpc

from llm_gateway.v1 import llm_gateway_pb2 as pb

from ..config import ApiKeySettings
from ..errors import api_key_disabled, api_key_expired, api_key_invalid, model_not_allowed
from ..transport.call_record import current_call
from .base import AdmissionInterceptor


def hash_key(key: str) -> str:
    """The SHA-256 hex digest under which a key is configured (`key_sha256`)."""
    return hashlib.sha256(key.encode()).hexdigest()


class AmbiguousCredentialsError(ValueError):
    """More than one credential was sent."""


def presented_key(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The key from `authorization: Bearer …` or `x-api-key`, or None when neither is sent.

    Raises:
        AmbiguousCredentialsError: more than one credential (two `authorization` entries, or
            both headers), even when they are equal: which one counts must never depend on order.
    """
    found: list[str] = []
    for name, value in metadata or ():
        if not isinstance(value, str):
            continue
        if name == "authorization":
            found.append(value[7:].strip() if value[:7].lower() == "bearer " else "")
        elif name == "x-api-key":
            found.append(value.strip())
    if len(found) > 1:
        raise AmbiguousCredentialsError
    return found[0] or None if found else None


def requested_models(request: object) -> list[str]:
    """The models a request names: its `model` and its explicit `routing.fallback_models`."""
    if isinstance(request, (pb.ChatRequest, pb.ChatStreamRequest, pb.EmbedRequest, pb.CountTokensRequest)):
        return [m for m in (request.model, *request.routing.fallback_models) if m]
    return []


class AuthInterceptor(AdmissionInterceptor):
    """Authenticates every non-exempt call and checks the requested model against the key's globs."""

    def __init__(self, keys: Sequence[ApiKeySettings]) -> None:
        super().__init__()
        self._by_hash = {k.key_sha256: k for k in keys}

    def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any], request: Any) -> ApiKeySettings:
        try:
            key = presented_key(context.invocation_metadata())
        except AmbiguousCredentialsError:
            raise api_key_invalid(
                "more than one credential sent: send exactly one of `authorization: Bearer <key>` or `x-api-key`"
            ) from None
        if key is None:
            raise api_key_invalid("missing API key: send `authorization: Bearer <key>` or `x-api-key`")
        digest = hash_key(key)
        entry = self._by_hash.get(digest)
        if entry is None or not hmac.compare_digest(entry.key_sha256, digest):
            raise api_key_invalid("the API key is not valid")
        if entry.disabled:
            raise api_key_disabled(entry.id)
        if entry.expires_at is not None and entry.expires_at.astimezone(UTC) <= datetime.now(UTC):
            raise api_key_expired(entry.id, entry.expires_at.isoformat())
        for model in requested_models(request):
            if not any(fnmatch.fnmatchcase(model, pattern) for pattern in entry.allowed_models):
                raise model_not_allowed(entry.id, model)
        return entry

    def admit(self, context: grpc.aio.ServicerContext[Any, Any], request: Any) -> None:
        """Authenticates the call and notes its key on the call record.

        Raises:
            GatewayError: UNAUTHENTICATED / PERMISSION_DENIED (see `_authenticate`).
        """
        entry = self._authenticate(context, request)
        record = current_call.get()
        if record is not None:
            record.key_id, record.owner, record.scope = entry.id, entry.owner or entry.id, f"key:{entry.id}"
