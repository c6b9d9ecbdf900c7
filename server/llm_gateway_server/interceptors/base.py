"""One base class for interceptors that wrap unary and server-streaming handlers alike, and the
one gRPC interceptor that runs them.

Subclasses implement `unary(inner, request, context, method)` and `stream(...)` (an async
generator). `InterceptorChain` builds the wrapped handler of each method once and reuses it.
Health and reflection calls pass through untouched (health's `Watch` writes with `context.write`).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

from ..errors import GatewayError
from ..transport.call_record import current_call
from ..transport.status import abort

EXEMPT_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


class GatewayInterceptor:
    """Base class of one layer of the gateway's chain (see module docstring); the layers run
    inside one gRPC interceptor, `InterceptorChain`. The defaults pass through."""

    async def unary(
        self, inner: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        """Wraps a unary call; the default passes through."""
        return await inner(request, context)

    async def stream(
        self, inner: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        """Wraps a server-streaming call; the default passes through."""
        async for item in inner(request, context):
            yield item


class AdmissionInterceptor(GatewayInterceptor):
    """A layer that only decides whether a call may go on (auth, validation): `admit` raises
    GatewayError to refuse it, answered with the call's request id; otherwise the call passes."""

    def admit(self, context: grpc.aio.ServicerContext[Any, Any], request: Any) -> None:
        """Raises GatewayError to refuse the call."""

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any], request: Any) -> None:
        try:
            self.admit(context, request)
        except GatewayError as error:
            record = current_call.get()
            await abort(context, error, record.request_id if record else "")

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


class InterceptorChain(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The gateway's interceptors as one gRPC interceptor, outermost first.

    gRPC runs each registered interceptor's `intercept_service` and a wrapper coroutine per layer
    on every call; the chain resolves the handler once per method and calls each layer's `unary` /
    `stream` directly (one frame per layer), which is what every call pays (bench/INSTRUCTIONS.md).
    Health and reflection pass through untouched, as with `GatewayInterceptor`.

    Args:
        interceptors: the layers of every other method (the data plane), outermost first.
        by_prefix: layers for the methods whose full name starts with a prefix instead (e.g.
            "/llm_gateway.admin.v1.AdminService/" → observability and admin auth): the admin
            API never runs the data plane's auth, limits or cache, and the data plane never runs
            admin auth.
    """

    def __init__(
        self,
        interceptors: Sequence[GatewayInterceptor],
        by_prefix: Mapping[str, Sequence[GatewayInterceptor]] | None = None,
    ) -> None:
        self._layers = tuple(interceptors)
        self._by_prefix = {prefix: tuple(layers) for prefix, layers in (by_prefix or {}).items()}
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler]] = {}

    @property
    def layers(self) -> tuple[GatewayInterceptor, ...]:
        """The interceptors, outermost first."""
        return self._layers

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def layers_for(self, method: str) -> tuple[GatewayInterceptor, ...]:
        """The layers that `method` (a full method name) runs, outermost first."""
        for prefix, layers in self._by_prefix.items():
            if method.startswith(prefix):
                return layers
        return self._layers

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        layers = self.layers_for(method)
        if handler.unary_unary is not None:
            unary: UnaryBehavior = handler.unary_unary
            for layer in reversed(layers):
                unary = functools.partial(layer.unary, unary, method=method)
            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream: StreamBehavior = handler.unary_stream
            for layer in reversed(layers):
                stream = functools.partial(layer.stream, stream, method=method)
            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def method_name(method: str) -> str:
    """`/pkg.Service/Chat` → `Chat`."""
    return method.rsplit("/", 1)[-1]
