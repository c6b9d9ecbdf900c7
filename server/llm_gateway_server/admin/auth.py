"""Authentication of admin calls: an admin credential in `authorization: Bearer …` (or
`x-api-key`), checked by SHA-256 in constant time against the configured admin digests
(`LLM_GATEWAY_ADMIN_KEY` and the YAML's `admin.key_sha256`). The credential is never logged or
echoed.

- no credential, more than one, or a wrong one → UNAUTHENTICATED / ADMIN_KEY_INVALID (when no
  admin credential is configured at all, the message says how to set one);
- a valid data-plane key → PERMISSION_DENIED / NOT_AN_ADMIN_KEY.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc

from ..config import Settings
from ..errors import GatewayError, admin_key_invalid, not_an_admin_key
from ..interceptors.auth import AmbiguousCredentialsError, hash_key, presented_key
from ..interceptors.base import GatewayInterceptor, StreamBehavior, UnaryBehavior
from ..store.base import StoreError
from ..transport.call_record import current_call, request_id_from
from ..transport.status import abort
from .servicer import ADMIN_METHOD_PREFIX

IsDataPlaneKey = Callable[[str], Awaitable[bool]]
"""`(secret) → whether it is a valid data-plane key` (the key cache's lookup)."""

NOT_CONFIGURED = (
    "the admin API has no credential configured: set LLM_GATEWAY_ADMIN_KEY "
    "(or list SHA-256 digests in the YAML file's admin.key_sha256)"
)


async def _no_data_plane_keys(secret: str) -> bool:
    return False


def admin_digests(settings: Settings) -> list[str]:
    """The SHA-256 hex digests of the admin credentials: `admin_key`'s and `admin.key_sha256`."""
    digests = list(settings.admin.key_sha256)
    if settings.admin_key is not None and settings.admin_key.get_secret_value():
        digests.append(hash_key(settings.admin_key.get_secret_value()))
    return digests


class AdminAuthInterceptor(GatewayInterceptor, grpc.aio.ServerInterceptor):  # type: ignore[misc]  # untyped base
    """Admits an admin call only with an admin credential (see the module docstring). Methods
    outside `prefix` (the AdminService by default) pass through untouched.

    A layer of `InterceptorChain` (the gateway's wiring); also a gRPC server interceptor of its
    own (`grpc.aio.server(interceptors=[AdminAuthInterceptor(...)])`) for a server that serves
    only the admin API.

    Args:
        digests: SHA-256 hex digests of the admin credentials (`admin_digests(settings)`);
            empty: every admin call is refused, saying no credential is configured.
        is_data_plane_key: tells a data-plane key (PERMISSION_DENIED) from a wrong credential
            (UNAUTHENTICATED); a failing lookup counts as "not a data-plane key". Default: none is.
        prefix: the full method name prefix of the calls to authenticate.
    """

    def __init__(
        self,
        digests: Iterable[str],
        is_data_plane_key: IsDataPlaneKey | None = None,
        prefix: str = ADMIN_METHOD_PREFIX,
    ) -> None:
        super().__init__()
        self._digests = tuple(sorted({d.lower() for d in digests}))
        self._is_data_plane_key = is_data_plane_key or _no_data_plane_keys
        self._prefix = prefix

    @classmethod
    def from_settings(cls, settings: Settings, is_data_plane_key: IsDataPlaneKey | None = None) -> AdminAuthInterceptor:
        """The interceptor for the settings' admin credentials."""
        return cls(admin_digests(settings), is_data_plane_key)

    @property
    def configured(self) -> bool:
        """Whether any admin credential is configured."""
        return bool(self._digests)

    def _is_admin(self, secret: str) -> bool:
        digest = hash_key(secret)
        matched = False
        for candidate in self._digests:  # every digest compared: the time does not say which matched
            matched |= hmac.compare_digest(candidate, digest)
        return matched

    async def check(self, metadata: Sequence[tuple[str, Any]] | None) -> None:
        """Admits the call's metadata or raises.

        Raises:
            GatewayError: UNAUTHENTICATED / ADMIN_KEY_INVALID, PERMISSION_DENIED / NOT_AN_ADMIN_KEY.
        """
        try:
            secret = presented_key(metadata)
        except AmbiguousCredentialsError:
            raise admin_key_invalid(
                "more than one credential sent: send exactly one `authorization: Bearer <admin key>`"
            ) from None
        if secret is not None and self._is_admin(secret):
            return
        if secret is not None:
            try:
                data_plane = await self._is_data_plane_key(secret)
            except (GatewayError, StoreError):
                data_plane = False  # the key store cannot tell; either way it is not an admin credential
            if data_plane:
                raise not_an_admin_key()
        if not self._digests:
            raise admin_key_invalid(NOT_CONFIGURED)
        if secret is None:
            raise admin_key_invalid("missing admin credential: send `authorization: Bearer <admin key>`")
        raise admin_key_invalid("the admin credential is not valid")

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = context.invocation_metadata()
        try:
            await self.check(metadata)
        except GatewayError as error:
            record = current_call.get()
            await abort(context, error, record.request_id if record is not None else request_id_from(metadata))

    async def unary(
        self, inner: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        """Authenticates an admin call, then runs it."""
        if method.startswith(self._prefix):
            await self._admit(context)
        return await inner(request, context)

    async def stream(
        self, inner: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        """Authenticates an admin call, then streams it (the AdminService has no streams today)."""
        if method.startswith(self._prefix):
            await self._admit(context)
        async for item in inner(request, context):
            yield item

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wraps the unary admin methods' handlers when used as a gRPC interceptor by itself."""
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(self._prefix):
            return handler
        inner: UnaryBehavior = handler.unary_unary

        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await self.unary(inner, request, context, method)

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
