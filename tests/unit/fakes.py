"""An in-process fake provider and the real data plane wired around it, for unit tests of the
router and the executor without gRPC or HTTP.

`FakeProvider` is a real `Provider` subclass whose calls follow a per-model script of steps:

- `Reply(...)`: answer (after waiting on `wait`, when given);
- `Raise(error)`: raise a `GatewayError` (or build one from `(provider, model)`);
- `Hang(release)`: block until `release` is set (forever when never set), then answer;
- `Stream(deltas, end=..., gate=...)`: (stream) wait on `gate`, yield the deltas, then end with
  the end event (`END`), stop without one (`STOP`), stall forever (`STALL`) or raise an error.

Each call pops the next step of its model; an unscripted call fails the test (AssertionError).
`World` builds catalog → registry → resolver → deployment states (fake clock) → executor → router
exactly as `app.build_application` does.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_gateway_server.config import (
    AliasSettings,
    BreakerSettings,
    DeploymentSettings,
    ModelSettings,
    PricingSettings,
    RetrySettings,
)
from llm_gateway_server.domain import (
    Capability,
    ChatDelta,
    ChatRequest,
    FinishReason,
    LiveModel,
    Message,
    OptionWarning,
    ProviderChatResult,
    ProviderEmbedResult,
    ProviderStreamEnd,
    ProviderStreamEvent,
    Role,
    RoutingOptions,
    TextPart,
    TokenCount,
    TokenCountMethod,
    ToolCall,
    Usage,
)
from llm_gateway_server.errors import GatewayError
from llm_gateway_server.providers.base import Provider, ProviderConfig
from llm_gateway_server.providers.registry import ProviderRegistry
from llm_gateway_server.routing.catalog import Catalog, load_catalog
from llm_gateway_server.routing.context import CallContext
from llm_gateway_server.routing.deployment_state import DeploymentStates
from llm_gateway_server.routing.executor import Executor, ExecutorSettings
from llm_gateway_server.routing.resolver import Deployment, Resolver
from llm_gateway_server.routing.router import Router

ErrorSpec = GatewayError | Callable[[str, str], GatewayError]
WAIT_S = 2.0  # bound on any wait for the fake's signals, so a broken test fails instead of hanging


# --- script steps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Answer (unary chat/embed/count): text, tool calls and usage; `wait` is awaited first."""

    text: str = "hello"
    usage: Usage | None = field(default_factory=lambda: Usage(input_tokens=10, output_tokens=5))
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: FinishReason = FinishReason.STOP
    model: str = ""  # the answered model id ("" : the provider model called)
    vectors: tuple[tuple[float, ...], ...] = ((0.1, 0.2),)
    wait: asyncio.Event | None = None


@dataclass(frozen=True)
class Raise:
    """Raise `error` (built from `(provider, model)` when a callable); `wait` is awaited first."""

    error: ErrorSpec
    wait: asyncio.Event | None = None


@dataclass(frozen=True)
class Hang:
    """Block until `release` is set (never, when it is not), then answer `then`."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    then: Reply = field(default_factory=Reply)


END = "end"  # a `ProviderStreamEnd` after the deltas
STOP = "stop"  # the upstream iterator ends without an end event
STALL = "stall"  # block forever after the deltas


@dataclass(frozen=True)
class Stream:
    """A stream: wait on `gate` (before the first event), yield `deltas` (strings are text deltas),
    then `end`: END, STOP, STALL or an error to raise."""

    deltas: Sequence[ChatDelta | str] = ("hel", "lo")
    end: str | ErrorSpec = END
    usage: Usage | None = field(default_factory=lambda: Usage(input_tokens=10, output_tokens=5))
    finish_reason: FinishReason = FinishReason.STOP
    gate: asyncio.Event | None = None


Step = Reply | Raise | Hang | Stream


@dataclass
class Call:
    """One call the fake received."""

    method: str
    model: str
    timeout_s: float
    request: ChatRequest | None = None


class FakeProvider(Provider):
    """A provider whose answers follow a per-model script (see module docstring).

    Attributes:
        calls: every call received, in order.
        entered: set whenever a call starts (tests wait on it, then clear it).
        closed_streams / open_streams: streams whose iterator was closed / is still open.
    """

    kind = "fake"

    def __init__(
        self,
        name: str,
        *,
        passthrough: bool = False,
        supports_embeddings: bool = True,
        requires_max_output_tokens: bool = False,
        warnings: tuple[OptionWarning, ...] = (),
        live_models: tuple[LiveModel, ...] = (),
    ) -> None:
        super().__init__(ProviderConfig(name=name, passthrough=passthrough))
        self.supports_embeddings = supports_embeddings
        self.requires_max_output_tokens = requires_max_output_tokens
        self._warnings = warnings
        self._live_models = live_models
        self._scripts: dict[str, list[Step]] = {}
        self.calls: list[Call] = []
        self.entered = asyncio.Event()
        self.open_streams = 0
        self.closed_streams = 0
        self.closed = False

    def _make_client(self, config: ProviderConfig) -> Any:
        return None

    # --- scripting -------------------------------------------------------------------------------

    def script(self, model: str, *steps: Step) -> FakeProvider:
        """Appends steps for calls to provider model `model`."""
        self._scripts.setdefault(model, []).extend(steps)
        return self

    def _next(self, method: str, model: str, timeout_s: float, request: ChatRequest | None = None) -> Step:
        self.calls.append(Call(method, model, timeout_s, request))
        self.entered.set()
        steps = self._scripts.get(model)
        if not steps:
            raise AssertionError(f"unscripted {method} call to {self.name}/{model}")
        return steps.pop(0)

    def pending(self, model: str) -> int:
        """Steps not used yet for `model`."""
        return len(self._scripts.get(model, ()))

    def error(self, spec: ErrorSpec, model: str) -> GatewayError:
        return spec if isinstance(spec, GatewayError) else spec(self.name, model)

    async def _unary(self, step: Step, model: str) -> Reply:
        if isinstance(step, Hang):
            await step.release.wait()
            return step.then
        if isinstance(step, Stream):
            raise AssertionError(f"Stream scripted for a unary call to {self.name}/{model}")
        if step.wait is not None:
            await step.wait.wait()
        if isinstance(step, Raise):
            raise self.error(step.error, model)
        return step

    # --- the Provider interface ------------------------------------------------------------------

    def chat_warnings(self, request: ChatRequest) -> tuple[OptionWarning, ...]:
        return self._warnings

    async def chat(self, request: ChatRequest, model: str, timeout_s: float) -> ProviderChatResult:
        reply = await self._unary(self._next("chat", model, timeout_s, request), model)
        return ProviderChatResult(
            model=reply.model or model,
            text=reply.text,
            tool_calls=reply.tool_calls,
            finish_reason=reply.finish_reason,
            provider_finish_reason=reply.finish_reason.value,
            usage=reply.usage,
            response_id=f"resp-{len(self.calls)}",
        )

    def chat_stream(self, request: ChatRequest, model: str, timeout_s: float) -> AsyncIterator[ProviderStreamEvent]:
        step = self._next("chat_stream", model, timeout_s, request)
        return self._stream(step, model)

    async def _stream(self, step: Step, model: str) -> AsyncIterator[ProviderStreamEvent]:
        self.open_streams += 1
        try:
            if not isinstance(step, Stream):
                await self._unary(step, model)  # Raise / Hang before the first event
                raise AssertionError(f"{type(step).__name__} answered a stream to {self.name}/{model}")
            if step.gate is not None:
                await step.gate.wait()
            for delta in step.deltas:
                yield ChatDelta(text=delta) if isinstance(delta, str) else delta
            if step.end == END:
                yield ProviderStreamEnd(model, step.finish_reason, step.finish_reason.value, step.usage, "resp-s")
            elif step.end == STALL:
                await asyncio.Event().wait()
            elif step.end != STOP:
                raise self.error(step.end, model)  # type: ignore[arg-type]
        finally:
            self.open_streams -= 1
            self.closed_streams += 1

    async def embed(
        self, model: str, inputs: tuple[str, ...], dimensions: int | None, timeout_s: float
    ) -> ProviderEmbedResult:
        reply = await self._unary(self._next("embed", model, timeout_s), model)
        vectors = tuple(reply.vectors[i % len(reply.vectors)] for i in range(len(inputs)))
        return ProviderEmbedResult(model=reply.model or model, vectors=vectors, usage=reply.usage)

    async def count_tokens(self, request: ChatRequest, model: str, timeout_s: float) -> TokenCount:
        if not self._scripts.get(model):
            return await super().count_tokens(request, model, timeout_s)
        reply = await self._unary(self._next("count_tokens", model, timeout_s, request), model)
        tokens = reply.usage.input_tokens if reply.usage else 0
        return TokenCount(tokens, TokenCountMethod.PROVIDER, model=model, provider=self.name)

    async def list_models(self, timeout_s: float) -> tuple[LiveModel, ...]:
        self.calls.append(Call("list_models", "", timeout_s))
        return self._live_models

    async def aclose(self) -> None:
        self.closed = True


# --- catalog entries -----------------------------------------------------------------------------

CHAT = [Capability.CHAT, Capability.STREAMING]
EMBED = [Capability.EMBEDDINGS]


def model(
    id: str,
    provider: str,
    provider_model: str | None = None,
    *,
    capabilities: Sequence[Capability] = (*CHAT, Capability.TOOLS, Capability.JSON_MODE),
    price: tuple[float, float] | None = (1.0, 2.0),
    group: str = "",
    max_output_tokens: int = 0,
) -> ModelSettings:
    """A catalog entry for a fake model (price: USD per million input/output tokens)."""
    pricing = (
        None if price is None else PricingSettings(input_per_million_usd=price[0], output_per_million_usd=price[1])
    )
    return ModelSettings(
        id=id,
        provider=provider,
        provider_model=provider_model,
        capabilities=list(capabilities),
        pricing=pricing,
        equivalence_group=group,
        max_output_tokens=max_output_tokens,
    )


# The default fake catalog: "alpha" on fake-a and "beta" on fake-b are equivalents (as are the two
# embedding models); "gamma" on fake-c has none; only the *-vision models take images.
DEFAULT_MODELS = (
    model("alpha", "fake-a", "alpha-v1", price=(1.0, 2.0), group="fake-eq", max_output_tokens=777),
    model("beta", "fake-b", "beta-v1", price=(0.5, 1.0), group="fake-eq"),
    model("gamma", "fake-c", "gamma-v1", price=(4.0, 8.0)),
    model("alpha-vision", "fake-a", "alpha-vision-v1", capabilities=(*CHAT, Capability.VISION)),
    model("beta-vision", "fake-b", "beta-vision-v1", capabilities=(*CHAT, Capability.VISION)),
    model("alpha-embed", "fake-a", "alpha-embed-v1", capabilities=EMBED, price=(0.1, 0.0), group="fake-emb"),
    model("beta-embed", "fake-b", "beta-embed-v1", capabilities=EMBED, price=(0.2, 0.0), group="fake-emb"),
)


def alias(
    name: str, *deployments: DeploymentSettings, strategy: str = "priority", fallbacks: Sequence[str] = ()
) -> AliasSettings:
    """An alias over `deployments` (see `dep`)."""
    return AliasSettings(name=name, deployments=list(deployments), strategy=strategy, fallback_models=list(fallbacks))  # type: ignore[arg-type]


def dep(provider: str, model_id: str, **kw: Any) -> DeploymentSettings:
    """One alias deployment (kw: weight, priority, rpm, tpm)."""
    return DeploymentSettings(provider=provider, model=model_id, **kw)


# --- the wired data plane ------------------------------------------------------------------------


class FakeClock:
    """Monotonic seconds for `DeploymentStates`, advanced by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


NO_DELAY_RETRY = RetrySettings(max_attempts=2, base_delay_s=0, max_delay_s=0, max_retry_after_s=1.0)
# A breaker that does not open during a test unless a test asks for it.
LENIENT_BREAKER = BreakerSettings(consecutive_failures=100, min_calls=100, cooldown_s=30.0)


@dataclass
class World:
    """The real catalog, registry, resolver, states, executor and router over fake providers."""

    providers: dict[str, FakeProvider]
    catalog: Catalog
    registry: ProviderRegistry
    resolver: Resolver
    states: DeploymentStates
    executor: Executor
    router: Router
    clock: FakeClock
    settings: ExecutorSettings

    def __getitem__(self, name: str) -> FakeProvider:
        return self.providers[name]

    def deployment(self, model_name: str, provider_hint: str = "") -> Deployment:
        """The first deployment the resolver finds for `model_name`."""
        return self.resolver.resolve_group(model_name, provider_hint, equivalents=False).deployments[0]

    def deployments(self, model_name: str) -> tuple[Deployment, ...]:
        return self.resolver.resolve_group(model_name, "", equivalents=False).deployments

    def in_flight(self, model_name: str, provider_hint: str = "") -> int:
        return self.states.get(self.deployment(model_name, provider_hint)).in_flight


@functools.cache
def _catalog(models_json: tuple[str, ...]) -> Catalog:
    """`load_catalog` once per distinct model list (the catalog is immutable; parsing the built-in
    data file for every test would dominate the suite's run time)."""
    return load_catalog([ModelSettings.model_validate_json(m) for m in models_json])


def build_world(
    *,
    providers: Sequence[FakeProvider | str] = ("fake-a", "fake-b", "fake-c"),
    models: Sequence[ModelSettings] = DEFAULT_MODELS,
    aliases: Sequence[AliasSettings] = (),
    retry: RetrySettings = NO_DELAY_RETRY,
    breaker: BreakerSettings = LENIENT_BREAKER,
    attempt_timeout_s: float = 2.0,
    stream_idle_timeout_s: float = 2.0,
    fallback_to_equivalents: bool = True,
    seed: int = 0,
) -> World:
    """Wires the data plane as `app.build_application` does, over fake providers."""
    fakes = {p.name: p for p in (FakeProvider(p) if isinstance(p, str) else p for p in providers)}
    catalog = _catalog(tuple(m.model_dump_json() for m in models))
    registry = ProviderRegistry(fakes)
    resolver = Resolver(catalog, registry, aliases)
    clock = FakeClock()
    states = DeploymentStates(breaker, clock=clock)
    settings = ExecutorSettings(retry, attempt_timeout_s, stream_idle_timeout_s, breaker.cooldown_s)
    executor = Executor(states, settings, rng=random.Random(seed))
    router = Router(
        catalog, resolver, executor, states, fallback_to_equivalents=fallback_to_equivalents, rng=random.Random(seed)
    )
    return World(fakes, catalog, registry, resolver, states, executor, router, clock, settings)


# --- requests and contexts -----------------------------------------------------------------------


def ctx(timeout_s: float = 5.0, request_id: str = "req-1") -> CallContext:
    """A call context whose deadline is `timeout_s` from now (call inside the event loop)."""
    return CallContext(request_id, deadline=asyncio.get_running_loop().time() + timeout_s)


def chat_request(model_name: str = "alpha", text: str = "hi", **kw: Any) -> ChatRequest:
    routing = kw.pop("routing", None) or RoutingOptions()
    return ChatRequest(model=model_name, messages=(Message(Role.USER, (TextPart(text),)),), routing=routing, **kw)


async def wait_for(event: asyncio.Event) -> None:
    """Waits for `event`, failing the test after WAIT_S instead of hanging."""
    async with asyncio.timeout(WAIT_S):
        await event.wait()


def summary(error: GatewayError) -> list[str]:
    """The error's `attempts` metadata as a list of `provider/model:REASON`."""
    return error.metadata["attempts"].split(",")
