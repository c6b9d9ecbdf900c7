"""Authentication: `authorization: Bearer <key>` or `x-api-key: <key>` metadata, resolved by the
key cache (`tenancy/key_cache.py`: configured keys and keys created through the admin API, held
only as SHA-256 digests and compared in constant time). Per key: revocation, expiry, disabled flag,
and allowed model globs, the key's and its team's (both must match; empty: every model). The key
itself is never logged or echoed.

When auth applies: as soon as any key exists (configured or created), every call needs a valid
one. With `anonymous_when_no_keys` (the gateway passes it only on a loopback bind) and no key at
all, calls pass without a key, whatever credential they carry (as before keys existed).
"""

from __future__ import annotations

import fnmatch
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from llm_gateway.v1 import llm_gateway_pb2 as pb

from ..errors import GatewayError, api_key_invalid, model_not_allowed
from ..tenancy.key_cache import KeyCache, hash_key
from ..tenancy.records import Tenant
from ..transport.call_record import current_call
from ..transport.status import abort
from .base import GatewayInterceptor, StreamBehavior, UnaryBehavior

__all__ = [
    "AmbiguousCredentialsError",
    "AuthInterceptor",
    "check_models",
    "hash_key",
    "presented_key",
    "requested_models",
]


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


def _allowed(model: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns)


def check_models(tenant: Tenant, models: Sequence[str]) -> None:
    """Every model must match the key's globs and its team's (empty globs: every model).

    Raises:
        GatewayError: PERMISSION_DENIED / MODEL_NOT_ALLOWED naming the first model refused.
    """
    key, team = tenant.key, tenant.team
    for model in models:
        if not _allowed(model, key.allowed_models):
            raise model_not_allowed(key.id, model)
        if team is not None and not _allowed(model, team.allowed_models):
            raise model_not_allowed(key.id, model, team_id=team.id)


class AuthInterceptor(GatewayInterceptor):
    """Authenticates every call of the chain it runs in (health and reflection never reach it),
    checks the requested models and notes the tenant on the call record.

    Args:
        cache: the key cache (configured keys and the store's).
        anonymous_when_no_keys: with no key at all, let calls through without one (only for a
            loopback bind); False: a call without a valid key is UNAUTHENTICATED even then.
    """

    def __init__(self, cache: KeyCache, *, anonymous_when_no_keys: bool = False) -> None:
        super().__init__()
        self._cache = cache
        self._anonymous = anonymous_when_no_keys

    @property
    def cache(self) -> KeyCache:
        """The key cache this interceptor resolves keys with."""
        return self._cache

    async def is_data_plane_key(self, secret: str) -> bool:
        """Whether `secret` is a working data-plane key (the admin API answers PERMISSION_DENIED
        for one instead of UNAUTHENTICATED)."""
        return await self._cache.is_key(secret)

    async def authenticate(self, context: grpc.aio.ServicerContext[Any, Any], request: Any) -> Tenant | None:
        """The call's tenant, or None for an anonymous call (no key exists and anonymous calls
        are allowed).

        Raises:
            GatewayError: UNAUTHENTICATED API_KEY_INVALID (no key, more than one, or unknown),
                API_KEY_REVOKED, API_KEY_EXPIRED; PERMISSION_DENIED API_KEY_DISABLED or
                MODEL_NOT_ALLOWED; UNAVAILABLE KEY_STORE_UNAVAILABLE (see `KeyCache.resolve`).
        """
        if self._anonymous and not await self._cache.keys_exist():
            return None
        try:
            secret = presented_key(context.invocation_metadata())
        except AmbiguousCredentialsError:
            raise api_key_invalid(
                "more than one credential sent: send exactly one of `authorization: Bearer <key>` or `x-api-key`"
            ) from None
        if secret is None:
            raise api_key_invalid("missing API key: send `authorization: Bearer <key>` or `x-api-key`")
        tenant = await self._cache.resolve(secret)
        check_models(tenant, requested_models(request))
        return tenant

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any], request: Any) -> None:
        record = current_call.get()
        try:
            tenant = await self.authenticate(context, request)
        except GatewayError as error:
            await abort(context, error, record.request_id if record else "")
        if record is not None and tenant is not None:
            key = tenant.key
            record.tenant, record.key_id, record.owner, record.scope = tenant, key.id, key.tenant, key.name

    async def unary(
        self, inner: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        await self._admit(context, request)
        return await inner(request, context)

    async def stream(
        self, inner: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        await self._admit(context, request)
        async for item in inner(request, context):
            yield item
