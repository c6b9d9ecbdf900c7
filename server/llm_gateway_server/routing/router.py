"""The data plane: resolves a request to a deployment, checks capabilities, calls the adapter under
the caller's deadline, and assembles the answer (usage, cost, attempts, final stream event).

Transport-neutral: the servicer calls it with domain objects and a `CallContext`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from ..domain import (
    Attempt,
    AttemptOutcome,
    Capability,
    ChatDelta,
    ChatRequest,
    ChatResponse,
    ChatStreamDelta,
    ChatStreamEvent,
    ChatStreamFinal,
    EmbedRequest,
    EmbedResponse,
    ImagePart,
    Message,
    ProviderStreamEnd,
    Role,
    TextPart,
    TokenCount,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from ..errors import GatewayError, capability_not_supported, deadline_exceeded
from ..providers.tokens import estimate_tokens
from .accounting import cost_of, usage_or_estimate
from .catalog import Catalog
from .resolver import Deployment, Resolver

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CallContext:
    """Per-call facts from the transport.

    Attributes:
        request_id: the gateway request id (from `x-request-id` or generated).
        deadline: absolute event-loop time (`loop.time()`, seconds) by which the call must end.
    """

    request_id: str
    deadline: float


class ToolCallAssembler:
    """Joins streamed tool-call fragments by index into complete calls."""

    def __init__(self) -> None:
        self._calls: dict[int, list[str]] = {}

    def add(self, fragments: tuple[ToolCallDelta, ...]) -> None:
        """Adds fragments: the first of an index sets id and name; arguments concatenate."""
        for fragment in fragments:
            call = self._calls.setdefault(fragment.index, ["", "", ""])
            if fragment.id:
                call[0] = fragment.id
            if fragment.name:
                call[1] = fragment.name
            call[2] += fragment.arguments

    def calls(self, request_id: str) -> tuple[ToolCall, ...]:
        """The assembled calls by index; a call without an id gets `call_<request id>_<index>`."""
        return tuple(
            ToolCall(id=c[0] or f"call_{request_id}_{i}", name=c[1], arguments=c[2])
            for i, c in sorted(self._calls.items())
        )


def _required_capabilities(request: ChatRequest) -> list[tuple[Capability, str]]:
    needs: list[tuple[Capability, str]] = [(Capability.CHAT, "chat")]
    if any(isinstance(p, ImagePart) for m in request.messages for p in m.content):
        needs.append((Capability.VISION, "image input"))
    if request.tools:
        needs.append((Capability.TOOLS, "tools"))
    fmt = request.generation.response_format
    if fmt is not None and fmt.type != "text":
        needs.append((Capability.JSON_MODE, "JSON output"))
    return needs


class Router:
    """Routes chat and embedding calls to provider adapters.

    Args:
        catalog: the model catalog (prices, capabilities).
        resolver: model name → deployment.
    """

    def __init__(self, catalog: Catalog, resolver: Resolver) -> None:
        self._catalog = catalog
        self._resolver = resolver

    def _alternatives(self, capability: Capability) -> tuple[str, ...]:
        """Models with `capability`, those of configured providers first."""
        configured = self._catalog.with_capability(capability, self._resolver.configured_providers())
        others = [m for m in self._catalog.with_capability(capability) if m not in configured]
        return (*configured, *others)

    @staticmethod
    def _with_output_limit(request: ChatRequest, deployment: Deployment) -> ChatRequest:
        """Fills `max_output_tokens` from the catalog for providers that require one."""
        if not deployment.provider.requires_max_output_tokens or request.generation.max_output_tokens is not None:
            return request
        limit = deployment.info.max_output_tokens if deployment.info and deployment.info.max_output_tokens else None
        if limit is None:
            return request
        return dataclasses.replace(request, generation=dataclasses.replace(request.generation, max_output_tokens=limit))

    def _chat_deployment(self, request: ChatRequest) -> Deployment:
        deployment = self._resolver.resolve(request.model, request.routing.provider)
        info = deployment.info
        if info is not None:
            for capability, what in _required_capabilities(request):
                if capability not in info.capabilities:
                    raise capability_not_supported(request.model, what, self._alternatives(capability))
        return deployment

    @staticmethod
    def _remaining(ctx: CallContext, deployment: Deployment) -> float:
        remaining = ctx.deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise deadline_exceeded(deployment.provider.name, deployment.provider_model, 0.0)
        return remaining

    @staticmethod
    def _deadline_error(ctx: CallContext, deployment: Deployment, budget_s: float, error: GatewayError) -> GatewayError:
        """An upstream timeout at (or after) the caller's deadline is the caller's deadline."""
        if error.metadata.get("failure") == "timeout" and asyncio.get_running_loop().time() >= ctx.deadline - 0.005:
            return deadline_exceeded(deployment.provider.name, deployment.provider_model, budget_s)
        return error

    async def _bounded(self, ctx: CallContext, deployment: Deployment, budget: float, call: Awaitable[T]) -> T:
        """Awaits an adapter call under the caller's deadline; errors gain provider/model metadata."""
        try:
            async with asyncio.timeout_at(ctx.deadline):
                return await call
        except TimeoutError:
            raise deadline_exceeded(deployment.provider.name, deployment.provider_model, budget) from None
        except GatewayError as error:
            raise self._deadline_error(ctx, deployment, budget, error).with_metadata(
                provider=deployment.provider.name, model=deployment.provider_model
            ) from None

    @staticmethod
    def _succeeded(deployment: Deployment, started: float) -> Attempt:
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        return Attempt(deployment.provider.name, deployment.provider_model, AttemptOutcome.SUCCESS, elapsed_ms)

    async def chat(self, request: ChatRequest, ctx: CallContext) -> ChatResponse:
        """Runs a unary chat.

        Raises:
            GatewayError: resolution, capability, provider and deadline failures.
        """
        deployment = self._chat_deployment(request)
        request = self._with_output_limit(request, deployment)
        provider = deployment.provider
        warnings = provider.plan_chat(request)
        budget = self._remaining(ctx, deployment)
        started = time.perf_counter()
        result = await self._bounded(ctx, deployment, budget, provider.chat(request, deployment.provider_model, budget))
        attempt = self._succeeded(deployment, started)
        usage = usage_or_estimate(
            result.usage, request.messages, len(result.text) + sum(len(c.arguments) for c in result.tool_calls)
        )
        pricing = deployment.info.pricing if deployment.info else None
        return ChatResponse(
            id=ctx.request_id,
            model=result.model,
            provider=provider.name,
            message=Message(
                role=Role.ASSISTANT,
                content=(TextPart(result.text),) if result.text else (),
                tool_calls=result.tool_calls,
            ),
            finish_reason=result.finish_reason,
            provider_finish_reason=result.provider_finish_reason,
            usage=usage,
            cost=cost_of(usage, pricing),
            attempts=(attempt,),
            warnings=warnings,
            provider_response_id=result.response_id,
        )

    async def chat_stream(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[ChatStreamEvent]:
        """Runs a streamed chat: `ChatStreamDelta` events, then exactly one `ChatStreamFinal`.

        Every wait for the next upstream event is bounded by the caller's deadline. A failure
        after content was sent raises GatewayError with code UNAVAILABLE and `chunks_sent`
        metadata; a stream never ends quietly without its final event.
        """
        deployment = self._chat_deployment(request)
        request = self._with_output_limit(request, deployment)
        provider = deployment.provider
        warnings = provider.plan_chat(request)
        budget = self._remaining(ctx, deployment)
        started = time.perf_counter()
        assembler = ToolCallAssembler()
        chunks_sent = 0
        output_chars = 0
        end: ProviderStreamEnd | None = None
        upstream = provider.chat_stream(request, deployment.provider_model, budget)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(ctx.deadline):
                        event = await anext(upstream)
                except StopAsyncIteration:
                    break
                if isinstance(event, ChatDelta):
                    if event.tool_calls:
                        assembler.add(event.tool_calls)
                    output_chars += len(event.text) + sum(len(f.arguments) for f in event.tool_calls)
                    chunks_sent += 1
                    yield ChatStreamDelta(model=deployment.provider_model, provider=provider.name, delta=event)
                else:
                    end = event
        except TimeoutError:
            error = deadline_exceeded(provider.name, deployment.provider_model, budget)
            raise error.with_metadata(chunks_sent=str(chunks_sent)) from None
        except GatewayError as error:
            mapped = self._deadline_error(ctx, deployment, budget, error)
            if chunks_sent and mapped.code != "DEADLINE_EXCEEDED":
                mapped.code = "UNAVAILABLE"  # content already reached the client: not retryable as a whole
            raise mapped.with_metadata(
                provider=provider.name, model=deployment.provider_model, chunks_sent=str(chunks_sent)
            ) from None
        finally:
            await upstream.aclose()  # type: ignore[attr-defined]
        if end is None:  # adapters raise instead; this guards the contract
            raise GatewayError(
                "UNAVAILABLE",
                "PROVIDER_BAD_RESPONSE",
                f"provider {provider.name!r} stream ended without a final event",
                metadata={
                    "provider": provider.name,
                    "model": deployment.provider_model,
                    "chunks_sent": str(chunks_sent),
                },
            )
        attempt = self._succeeded(deployment, started)
        usage = usage_or_estimate(end.usage, request.messages, output_chars)
        yield ChatStreamFinal(
            model=end.model,
            provider=provider.name,
            finish_reason=end.finish_reason,
            provider_finish_reason=end.provider_finish_reason,
            usage=usage,
            cost=cost_of(usage, deployment.info.pricing if deployment.info else None),
            tool_calls=assembler.calls(ctx.request_id),
            attempts=(attempt,),
            warnings=warnings,
            provider_response_id=end.response_id,
        )

    async def embed(self, request: EmbedRequest, ctx: CallContext) -> EmbedResponse:
        """Embeds the request's inputs.

        Raises:
            GatewayError: CAPABILITY_NOT_SUPPORTED (naming embedding models) for a model that
                cannot embed; provider and deadline failures.
        """
        deployment = self._resolver.resolve(request.model, request.routing.provider)
        info = deployment.info
        cannot_embed = not deployment.provider.supports_embeddings
        if cannot_embed or (info is not None and Capability.EMBEDDINGS not in info.capabilities):
            raise capability_not_supported(request.model, "embeddings", self._alternatives(Capability.EMBEDDINGS))
        provider = deployment.provider
        budget = self._remaining(ctx, deployment)
        started = time.perf_counter()
        call = provider.embed(deployment.provider_model, request.inputs, request.dimensions, budget)
        result = await self._bounded(ctx, deployment, budget, call)
        attempt = self._succeeded(deployment, started)
        usage = (
            result.usage
            if result.usage is not None and result.usage.input_tokens
            else Usage(input_tokens=sum(estimate_tokens(len(t)) for t in request.inputs), estimated=True)
        )
        return EmbedResponse(
            id=ctx.request_id,
            model=result.model,
            provider=provider.name,
            vectors=result.vectors,
            usage=usage,
            cost=cost_of(usage, info.pricing if info else None),
            attempts=(attempt,),
        )

    async def count_tokens(self, request: ChatRequest, ctx: CallContext) -> TokenCount:
        """Counts the input tokens of `request` on its model (provider count, tokenizer, or
        estimate; see `Provider.count_tokens`).

        Raises:
            GatewayError: resolution, provider and deadline failures.
        """
        deployment = self._resolver.resolve(request.model, request.routing.provider)
        budget = self._remaining(ctx, deployment)
        call = deployment.provider.count_tokens(request, deployment.provider_model, budget)
        return await self._bounded(ctx, deployment, budget, call)
