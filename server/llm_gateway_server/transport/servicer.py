"""The `llm_gateway.v1.LLMGatewayService` servicer: converts protobuf ↔ domain and delegates to
the router / model directory. Nothing else lives here (requests arrive validated: the validation
interceptor runs before the rate limiter and the cache).

One decorator (`_rpc`) wraps unary and server-streaming handlers alike: it assigns the request
id, computes the deadline, and turns `GatewayError` into a rich status; any other exception is a
bug, logged with its traceback and answered INTERNAL with the request id only.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import structlog

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc

from ..errors import FieldViolation, GatewayError, internal_error, invalid_request, server_shutting_down
from ..routing.context import CallContext
from ..routing.directory import ModelDirectory
from ..routing.router import Router
from . import convert
from .call_record import CallRecord, current_call, request_id_from
from .coalesce import coalesced
from .status import abort

log = structlog.get_logger(__name__)
_BYTES_PER_FLOAT = 4  # a packed float32 in EmbedResponse
F = TypeVar("F", bound=Callable[..., Any])


def _rpc(handler: F) -> F:
    """Wraps a handler `(self, request, context, ctx)` for unary or streaming RPCs."""

    def begin(self: LLMGatewayServicer, context: grpc.aio.ServicerContext) -> CallContext:
        record = current_call.get()
        if record is None:  # served without the observability interceptor (it sets the record)
            record = CallRecord(request_id_from(context.invocation_metadata()), handler.__name__, context.peer())
            current_call.set(record)
        remaining = context.time_remaining()
        budget = self.default_deadline_s if remaining is None else min(remaining, self.default_deadline_s)
        deadline = asyncio.get_running_loop().time() + budget
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        return CallContext(request_id=record.request_id, deadline=deadline, outcome=record.outcome)

    async def cancelled(self: LLMGatewayServicer, context: grpc.aio.ServicerContext, ctx: CallContext) -> None:
        """A cancelled call: re-raised, unless the drain cut it (then it ends with a status)."""
        if self.draining:
            await abort(context, server_shutting_down(), ctx.request_id)

    async def fail(context: grpc.aio.ServicerContext, ctx: CallContext, exc: Exception) -> NoReturn:
        if isinstance(exc, GatewayError):  # the interceptor's rpc log line carries its details
            await abort(context, exc, ctx.request_id)
        log.error("rpc_bug", method=handler.__name__, request_id=ctx.request_id, exc_info=exc)
        await abort(context, internal_error(ctx.request_id), ctx.request_id)

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream_wrapper(
            self: LLMGatewayServicer, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            ctx = begin(self, context)
            context.set_trailing_metadata((("x-request-id", ctx.request_id),))
            try:
                async for item in handler(self, request, context, ctx):
                    yield item
            except asyncio.CancelledError:
                await cancelled(self, context, ctx)
                raise
            except Exception as exc:  # noqa: BLE001 - the one place that answers every failure
                await fail(context, ctx, exc)
            finally:
                self._in_flight.discard(asyncio.current_task())

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary_wrapper(self: LLMGatewayServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        ctx = begin(self, context)
        context.set_trailing_metadata((("x-request-id", ctx.request_id),))
        try:
            return await handler(self, request, context, ctx)
        except asyncio.CancelledError:
            await cancelled(self, context, ctx)
            raise
        except Exception as exc:  # noqa: BLE001 - the one place that answers every failure
            await fail(context, ctx, exc)
        finally:
            self._in_flight.discard(asyncio.current_task())

    return unary_wrapper  # type: ignore[return-value]


class LLMGatewayServicer(pb_grpc.LLMGatewayServiceServicer):  # type: ignore[misc]  # generated base is untyped
    """gRPC servicer for `llm_gateway.v1.LLMGatewayService`.

    Args:
        router: runs chat and embedding calls.
        models: answers ListModels / GetModel.
        default_deadline_s: bound on a call whose client set no deadline, seconds.
        coalesce_deltas: merge the stream deltas already waiting when the next message is
            written (see `transport.coalesce`).
        max_response_bytes: the largest answer the server may send (`max_message_bytes`); an
            Embed answer past it is refused with INVALID_ARGUMENT naming the limit.
    """

    def __init__(
        self,
        router: Router,
        models: ModelDirectory,
        default_deadline_s: float,
        coalesce_deltas: bool = True,
        max_response_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.router = router
        self.models = models
        self.default_deadline_s = default_deadline_s
        self.coalesce_deltas = coalesce_deltas
        self.max_response_bytes = max_response_bytes
        self.draining = False
        self._in_flight: set[asyncio.Task[Any]] = set()

    def cut_in_flight(self) -> int:
        """Ends every call still running (the end of a drain's grace period): each is answered
        UNAVAILABLE / SERVER_SHUTTING_DOWN with its `google.rpc.Status` instead of being dropped
        with a bare CANCELLED. Returns how many were cut."""
        self.draining = True
        tasks = [t for t in self._in_flight if not t.done()]
        for task in tasks:
            task.cancel("drain grace period over")
        return len(tasks)

    @_rpc
    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext, ctx: CallContext
    ) -> pb.ChatResponse:
        """Unary chat."""
        response = await self.router.chat(convert.chat_request_in(request), ctx)
        return convert.chat_response_out(response)

    @_rpc
    async def ChatStream(
        self, request: pb.ChatStreamRequest, context: grpc.aio.ServicerContext, ctx: CallContext
    ) -> AsyncIterator[pb.ChatStreamResponse]:
        """Server-streaming chat: deltas, then one final event."""
        events = self.router.chat_stream(convert.chat_request_in(request), ctx)
        if self.coalesce_deltas:
            events = coalesced(events)
        try:
            async for event in events:
                yield convert.stream_event_out(ctx.request_id, event)
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    @_rpc
    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext, ctx: CallContext
    ) -> pb.EmbedResponse:
        """Embeddings."""
        response = await self.router.embed(convert.embed_request_in(request), ctx)
        values = sum(len(v) for v in response.vectors)
        if values * _BYTES_PER_FLOAT > self.max_response_bytes:
            raise invalid_request(
                [
                    FieldViolation(
                        "inputs",
                        f"the answer holds {values} values (~{values * _BYTES_PER_FLOAT} bytes), more than "
                        f"max_message_bytes ({self.max_response_bytes}); send fewer inputs or set dimensions",
                    )
                ]
            )
        return convert.embed_response_out(response)

    @_rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext, ctx: CallContext
    ) -> pb.ListModelsResponse:
        """Paginated model listing."""
        capability = convert.CAPABILITIES_IN.get(request.capability)
        page = await self.models.list(request.provider, capability, request.page_size, request.page_token)
        return pb.ListModelsResponse(
            models=[convert.model_out(m) for m in page.models],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    @_rpc
    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext, ctx: CallContext
    ) -> pb.GetModelResponse:
        """One model by name."""
        return pb.GetModelResponse(model=convert.model_out(await self.models.get(request.name)))

    @_rpc
    async def CountTokens(
        self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext, ctx: CallContext
    ) -> pb.CountTokensResponse:
        """Input-token count of a chat request."""
        count = await self.router.count_tokens(convert.count_tokens_request_in(request), ctx)
        return convert.count_tokens_out(count)
