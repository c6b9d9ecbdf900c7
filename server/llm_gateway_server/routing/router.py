"""The data plane: plans the deployments for a request (aliases, strategy, fallbacks, capability
checks), runs the call through the `Executor` (breakers, retries, deadlines), and assembles the
answer (usage, cost, attempts, final stream event).

Transport-neutral: the servicer calls it with domain objects and a `CallContext`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Awaitable, Callable

from ..domain import (
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
    ProviderChatResult,
    ProviderEmbedResult,
    ProviderStreamEvent,
    Role,
    RoutingOptions,
    RoutingStrategy,
    TextPart,
    TokenCount,
    Usage,
)
from ..errors import GatewayError, capability_not_supported, deadline_exceeded
from ..estimates import estimate_input_tokens, estimate_tokens
from .accounting import cost_of, usage_or_estimate
from .catalog import Catalog
from .context import CallContext
from .deployment_state import DeploymentStates
from .executor import Executor
from .resolver import Deployment, Resolver
from .strategies import order
from .tool_calls import ToolCallAssembler

Check = Callable[[Deployment], GatewayError | None]


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
    """Routes chat and embedding calls to provider deployments.

    Args:
        catalog: the model catalog (prices, capabilities, equivalents).
        resolver: model names and aliases → deployments.
        executor: runs attempts (breakers, retries, timeouts).
        states: live deployment state, read by the strategies (latency, calls in flight).
        fallback_to_equivalents: whether catalog equivalents are default fallbacks.
        rng: randomness for the weighted strategy (seedable in tests).
    """

    def __init__(
        self,
        catalog: Catalog,
        resolver: Resolver,
        executor: Executor,
        states: DeploymentStates,
        *,
        fallback_to_equivalents: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self._catalog = catalog
        self._resolver = resolver
        self._executor = executor
        self._states = states
        self._equivalents = fallback_to_equivalents
        self._rng = rng or random.Random()

    # --- planning ----------------------------------------------------------------------------

    def _alternatives(self, capability: Capability) -> tuple[str, ...]:
        """Models with `capability`, those of configured providers first."""
        configured = self._catalog.with_capability(capability, self._resolver.configured_providers())
        others = [m for m in self._catalog.with_capability(capability) if m not in configured]
        return (*configured, *others)

    def _chat_check(self, request: ChatRequest) -> Check:
        needs = _required_capabilities(request)

        def check(deployment: Deployment) -> GatewayError | None:
            if deployment.info is None:
                return None
            for capability, what in needs:
                if capability not in deployment.info.capabilities:
                    return capability_not_supported(
                        request.model, what, self._alternatives(capability), provider=deployment.provider.name
                    )
            return None

        return check

    def _embed_check(self, model: str) -> Check:
        def check(deployment: Deployment) -> GatewayError | None:
            info = deployment.info
            if not deployment.provider.supports_embeddings or (
                info is not None and Capability.EMBEDDINGS not in info.capabilities
            ):
                return capability_not_supported(
                    model, "embeddings", self._alternatives(Capability.EMBEDDINGS), provider=deployment.provider.name
                )
            return None

        return check

    def _plan(self, model: str, routing: RoutingOptions, check: Check) -> list[Deployment]:
        """Deployments to try, in order: the model's own (ordered by strategy), then, when
        fallback is allowed, those of the fallback models. Deployments that cannot serve the
        request are left out; when none of the model's own can, its capability error is raised."""
        group = self._resolver.resolve_group(model, routing.provider, self._equivalents)
        strategy = routing.strategy if routing.strategy is not RoutingStrategy.CONFIGURED else group.strategy
        own = [d for d in group.deployments if check(d) is None]
        if not own:
            error = check(group.deployments[0])
            assert error is not None
            raise error
        plan = order(own, strategy or RoutingStrategy.PRIORITY, self._states, self._rng)
        if not routing.fallback:
            return plan
        seen = {d.key for d in plan}
        for name in routing.fallback_models or group.fallback_models:
            try:
                fallback = self._resolver.resolve_group(name, routing.provider, equivalents=False)
            except GatewayError:
                continue  # an unknown or unconfigured fallback model is not an error of this call
            candidates = [d for d in fallback.deployments if d.key not in seen and check(d) is None]
            for deployment in order(candidates, fallback.strategy or RoutingStrategy.PRIORITY, self._states, self._rng):
                seen.add(deployment.key)
                plan.append(deployment)
        return plan

    @staticmethod
    def _prepared(request: ChatRequest, deployment: Deployment) -> ChatRequest:
        """Fills `max_output_tokens` from the catalog for providers that require one."""
        if not deployment.provider.requires_max_output_tokens or request.generation.max_output_tokens is not None:
            return request
        limit = deployment.info.max_output_tokens if deployment.info and deployment.info.max_output_tokens else None
        if limit is None:
            return request
        return dataclasses.replace(request, generation=dataclasses.replace(request.generation, max_output_tokens=limit))

    @staticmethod
    def _token_estimate(request: ChatRequest) -> int:
        return estimate_input_tokens(request.messages) + (request.generation.max_output_tokens or 0)

    # --- calls -------------------------------------------------------------------------------

    async def chat(self, request: ChatRequest, ctx: CallContext) -> ChatResponse:
        """Runs a unary chat along its plan.

        Raises:
            GatewayError: resolution, capability, provider and deadline failures.
        """
        plan = self._plan(request.model, request.routing, self._chat_check(request))

        def call(deployment: Deployment, timeout_s: float) -> Awaitable[ProviderChatResult]:
            return deployment.provider.chat(self._prepared(request, deployment), deployment.provider_model, timeout_s)

        done = await self._executor.run(plan, ctx, self._token_estimate(request), call)
        result, deployment = done.result, done.deployment
        output_chars = len(result.text) + sum(len(c.arguments) for c in result.tool_calls)
        usage = usage_or_estimate(result.usage, request.messages, output_chars)
        cost = cost_of(usage, deployment.info.pricing if deployment.info else None)
        ctx.outcome.succeed(result.model, usage, cost, done.attempts)
        return ChatResponse(
            id=ctx.request_id,
            model=result.model,
            provider=deployment.provider.name,
            message=Message(
                role=Role.ASSISTANT,
                content=(TextPart(result.text),) if result.text else (),
                tool_calls=result.tool_calls,
            ),
            finish_reason=result.finish_reason,
            provider_finish_reason=result.provider_finish_reason,
            usage=usage,
            cost=cost,
            attempts=done.attempts,
            warnings=deployment.provider.chat_warnings(request),
            provider_response_id=result.response_id,
        )

    async def chat_stream(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[ChatStreamEvent]:
        """Runs a streamed chat: `ChatStreamDelta` events, then exactly one `ChatStreamFinal`.

        Retries and fallbacks happen until the first upstream event (`Executor.stream`); after
        that the committed stream raises GatewayError on failure (UNAVAILABLE once content was
        sent, with `chunks_sent` metadata). A stream never ends quietly without its final event.
        """
        plan = self._plan(request.model, request.routing, self._chat_check(request))

        def start(deployment: Deployment, timeout_s: float) -> AsyncIterator[ProviderStreamEvent]:
            prepared = self._prepared(request, deployment)
            return deployment.provider.chat_stream(prepared, deployment.provider_model, timeout_s)

        stream = await self._executor.stream(plan, ctx, self._token_estimate(request), start)
        deployment = stream.deployment
        model, provider = deployment.provider_model, deployment.provider.name
        assembler = ToolCallAssembler()
        output_chars = 0
        try:
            async for event in stream:
                if isinstance(event, ChatDelta):
                    if event.tool_calls:
                        assembler.add(event.tool_calls)
                        output_chars += sum(len(f.arguments) for f in event.tool_calls)
                    output_chars += len(event.text)
                    yield ChatStreamDelta(model=model, provider=provider, delta=event)
                    continue
                usage = usage_or_estimate(event.usage, request.messages, output_chars)
                cost = cost_of(usage, deployment.info.pricing if deployment.info else None)
                attempts = stream.attempts
                ctx.outcome.succeed(event.model, usage, cost, attempts)
                yield ChatStreamFinal(
                    model=event.model,
                    provider=provider,
                    finish_reason=event.finish_reason,
                    provider_finish_reason=event.provider_finish_reason,
                    usage=usage,
                    cost=cost,
                    tool_calls=assembler.calls(ctx.request_id),
                    attempts=attempts,
                    warnings=deployment.provider.chat_warnings(request),
                    provider_response_id=event.response_id,
                )
        finally:
            if not ctx.outcome.completed:
                # Cut after the stream was committed (upstream failure, client cancel, drain):
                # the provider was paid for the input and the output so far. The estimate is the
                # call's usage and cost (ledger, budgets, limits, metrics).
                usage = usage_or_estimate(None, request.messages, output_chars)
                ctx.outcome.usage = usage
                ctx.outcome.cost = cost_of(usage, deployment.info.pricing if deployment.info else None)
            await stream.aclose()

    async def embed(self, request: EmbedRequest, ctx: CallContext) -> EmbedResponse:
        """Embeds the request's inputs along its plan.

        Raises:
            GatewayError: CAPABILITY_NOT_SUPPORTED (naming embedding models) for a model that
                cannot embed; provider and deadline failures.
        """
        plan = self._plan(request.model, request.routing, self._embed_check(request.model))
        tokens = sum(estimate_tokens(len(t)) for t in request.inputs)

        def call(deployment: Deployment, timeout_s: float) -> Awaitable[ProviderEmbedResult]:
            return deployment.provider.embed(deployment.provider_model, request.inputs, request.dimensions, timeout_s)

        done = await self._executor.run(plan, ctx, tokens, call)
        result, deployment = done.result, done.deployment
        usage = (
            result.usage
            if result.usage is not None and result.usage.input_tokens
            else Usage(input_tokens=tokens, estimated=True)
        )
        cost = cost_of(usage, deployment.info.pricing if deployment.info else None)
        ctx.outcome.succeed(result.model, usage, cost, done.attempts)
        return EmbedResponse(
            id=ctx.request_id,
            model=result.model,
            provider=deployment.provider.name,
            vectors=result.vectors,
            usage=usage,
            cost=cost,
            attempts=done.attempts,
        )

    async def count_tokens(self, request: ChatRequest, ctx: CallContext) -> TokenCount:
        """Counts the input tokens of `request` on its model's first deployment (provider count,
        tokenizer, or estimate; see `Provider.count_tokens`).

        Raises:
            GatewayError: resolution, provider and deadline failures.
        """
        deployment = self._resolver.resolve_group(request.model, request.routing.provider, False).deployments[0]
        ctx.outcome.resolve(deployment.provider.name, deployment.provider_model)
        remaining = ctx.deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise deadline_exceeded(deployment.provider.name, deployment.provider_model, 0.0)
        call = deployment.provider.count_tokens(request, deployment.provider_model, remaining)
        count = await self._executor.bounded(ctx, deployment, call, remaining)
        ctx.outcome.completed = True
        return count
