"""`routing/router.py` against the in-process fake provider: planning (aliases, priorities,
strategies, fallbacks to alias models and catalog equivalents, capability checks), the unary and
streamed answers (usage, cost, attempts, tool calls), embeddings, token counts, and the
`CallOutcome` the router fills.

No gRPC, no HTTP: the real catalog, resolver, deployment states, executor and router are wired
over `tests/unit/fakes.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest

from llm_gateway_server.config import BreakerSettings, RetrySettings
from llm_gateway_server.domain import (
    ChatDelta,
    ChatRequest,
    ChatStreamDelta,
    ChatStreamFinal,
    EmbedRequest,
    GenerationOptions,
    ImagePart,
    LiveModel,
    Message,
    OptionWarning,
    ResponseFormat,
    Role,
    RoutingOptions,
    RoutingStrategy,
    TextPart,
    TokenCountMethod,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from llm_gateway_server.errors import GatewayError, Reason
from llm_gateway_server.providers.errors import from_http_status

from .fakes import (
    STALL,
    FakeProvider,
    Hang,
    Raise,
    Reply,
    Stream,
    World,
    alias,
    build_world,
    chat_request,
    ctx,
    dep,
    model,
    summary,
    wait_for,
)

A, B, C = "fake-a/alpha-v1", "fake-b/beta-v1", "fake-c/gamma-v1"
ONE_TRY = RetrySettings(max_attempts=1)


def http(status: int, **kw: object):
    return lambda provider, model_id: from_http_status(provider, model_id, status, "x", **kw)  # type: ignore[arg-type]


def tried(attempts) -> list[str]:
    return [f"{a.provider}/{a.model}:{a.error_reason or a.outcome.value}" for a in attempts]


def image_request(model_name: str, **kw) -> ChatRequest:
    content = (TextPart("what is this?"), ImagePart(url="https://example.com/cat.png"))
    return dataclasses.replace(chat_request(model_name, **kw), messages=(Message(Role.USER, content),))


async def collect(world: World, request, call) -> list:
    return [event async for event in world.router.chat_stream(request, call)]


# --- unary chat: the answer and the outcome -------------------------------------------------------


async def test_chat_answer_has_usage_cost_attempts_and_outcome() -> None:
    warning = OptionWarning("OPTION_DROPPED", "generation.seed", "seed is not supported")
    world = build_world(providers=[FakeProvider("fake-a", warnings=(warning,)), "fake-b", "fake-c"])
    tool_call = ToolCall("call_1", "lookup", '{"q": 1}')
    world["fake-a"].script(
        "alpha-v1", Reply(text="hi!", usage=Usage(1000, 500), tool_calls=(tool_call,), model="alpha-v1-2025")
    )
    call = ctx(request_id="req-42")
    response = await world.router.chat(chat_request("alpha"), call)
    assert (response.id, response.model, response.provider) == ("req-42", "alpha-v1-2025", "fake-a")
    assert response.message.text == "hi!" and response.message.tool_calls == (tool_call,)
    assert response.usage == Usage(1000, 500)
    assert response.cost.priced
    assert response.cost.input_usd == pytest.approx(1000 * 1.0 / 1e6)
    assert response.cost.output_usd == pytest.approx(500 * 2.0 / 1e6)
    assert tried(response.attempts) == [f"{A}:success"]
    assert response.warnings == (warning,)
    assert response.provider_response_id == "resp-1"
    outcome = call.outcome
    assert (outcome.provider, outcome.model, outcome.answered_model) == ("fake-a", "alpha-v1", "alpha-v1-2025")
    assert outcome.usage == response.usage and outcome.cost == response.cost
    assert outcome.attempts == response.attempts and outcome.completed
    assert outcome.code is grpc.StatusCode.OK and outcome.ttft_ms is None


async def test_chat_usage_is_estimated_when_the_provider_reports_none() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Reply(text="x" * 40, usage=None))
    response = await world.router.chat(chat_request("alpha", text="y" * 8), ctx())
    assert response.usage.estimated
    assert response.usage.output_tokens == 10  # 40 chars / 4
    assert response.usage.input_tokens == 2 + 4  # 8 chars / 4 + message framing


async def test_unpriced_model_costs_nothing_and_says_so() -> None:
    world = build_world(models=[model("free", "fake-a", price=None)])
    world["fake-a"].script("free", Reply())
    response = await world.router.chat(chat_request("free"), ctx())
    assert not response.cost.priced and response.cost.total_usd == 0


async def test_empty_answer_has_no_content_parts() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Reply(text=""))
    response = await world.router.chat(chat_request("alpha"), ctx())
    assert response.message.content == ()


async def test_outcome_after_failure_keeps_the_last_deployment_and_its_attempts() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Raise(http(503)), Raise(http(503)))
    world["fake-b"].script("beta-v1", Raise(http(502)), Raise(http(500)))
    call = ctx()
    with pytest.raises(GatewayError) as raised:
        await world.router.chat(chat_request("alpha"), call)  # alpha, then its equivalent beta
    outcome = call.outcome
    assert (outcome.provider, outcome.model) == ("fake-b", "beta-v1")
    assert tried(outcome.attempts) == [f"{A}:PROVIDER_UNAVAILABLE"] * 2 + [f"{B}:PROVIDER_UNAVAILABLE"] * 2
    assert summary(raised.value) == tried(outcome.attempts)
    assert not outcome.completed and outcome.usage is None and outcome.cost is None


# Found by this test, fixed since: it was a strict xfail.
async def test_outcome_after_failure_includes_skipped_attempts() -> None:
    world = build_world(breaker=BreakerSettings(consecutive_failures=1, min_calls=100, cooldown_s=5.0))
    for deployment in (world.deployment("alpha"), world.deployment("beta")):
        world.states.record(deployment, success=False)
    call = ctx()
    with pytest.raises(GatewayError) as raised:
        await world.router.chat(chat_request("alpha"), call)
    assert raised.value.reason is Reason.CIRCUIT_OPEN
    assert tried(call.outcome.attempts) == [f"{A}:CIRCUIT_OPEN", f"{B}:CIRCUIT_OPEN"]


async def test_deadline_through_the_router() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Hang())
    call = ctx(0.05)
    with pytest.raises(GatewayError) as raised:
        await world.router.chat(chat_request("alpha"), call)
    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert (call.outcome.provider, call.outcome.model) == ("fake-a", "alpha-v1")
    assert tried(call.outcome.attempts) == [f"{A}:DEADLINE_EXCEEDED"]
    assert world["fake-b"].calls == []  # no fallback past the deadline


async def test_chat_in_flight_while_waiting_and_after() -> None:
    world = build_world()
    release = asyncio.Event()
    world["fake-a"].script("alpha-v1", Reply(wait=release))
    task = asyncio.create_task(world.router.chat(chat_request("alpha"), ctx()))
    await wait_for(world["fake-a"].entered)
    assert world.in_flight("alpha") == 1
    release.set()
    await task
    assert world.in_flight("alpha") == 0


# --- planning: aliases, fallbacks, equivalents ---------------------------------------------------


async def test_alias_deployments_are_tried_by_priority() -> None:
    world = build_world(aliases=[alias("pool", dep("fake-b", "beta", priority=1), dep("fake-a", "alpha", priority=0))])
    world["fake-a"].script("alpha-v1", Reply())
    response = await world.router.chat(chat_request("pool"), ctx())
    assert response.provider == "fake-a"


async def test_fallback_to_the_alias_next_deployment() -> None:
    world = build_world(aliases=[alias("pool", dep("fake-a", "alpha"), dep("fake-c", "gamma"))])
    world["fake-a"].script("alpha-v1", Raise(http(503)), Raise(http(503)))
    world["fake-c"].script("gamma-v1", Reply())
    call = ctx()
    response = await world.router.chat(chat_request("pool"), call)
    assert response.provider == "fake-c"
    assert tried(response.attempts) == [f"{A}:PROVIDER_UNAVAILABLE"] * 2 + [f"{C}:success"]
    assert (call.outcome.provider, call.outcome.model) == ("fake-c", "gamma-v1")


@pytest.mark.parametrize(
    ("equivalents", "routing", "expected"),
    [
        pytest.param(True, RoutingOptions(), [f"{A}:PROVIDER_UNAVAILABLE", f"{B}:success"], id="catalog-equivalent"),
        pytest.param(False, RoutingOptions(), [f"{A}:PROVIDER_UNAVAILABLE"], id="equivalents-off"),
        pytest.param(True, RoutingOptions(fallback=False), [f"{A}:PROVIDER_UNAVAILABLE"], id="request-no-fallback"),
        pytest.param(
            True,
            RoutingOptions(fallback_models=("no-such-model", "gamma")),
            [f"{A}:PROVIDER_UNAVAILABLE", f"{C}:success"],
            id="request-fallback-models",
        ),
    ],
)
async def test_fallback_to_catalog_equivalents(equivalents: bool, routing: RoutingOptions, expected) -> None:
    world = build_world(fallback_to_equivalents=equivalents, retry=ONE_TRY)
    world["fake-a"].script("alpha-v1", Raise(http(503)))
    world["fake-b"].script("beta-v1", Reply())
    world["fake-c"].script("gamma-v1", Reply())
    call = ctx()
    try:
        response = await world.router.chat(chat_request("alpha", routing=routing), call)
        attempts = response.attempts
    except GatewayError as error:
        assert error.reason is Reason.PROVIDER_UNAVAILABLE
        attempts = call.outcome.attempts
    assert tried(attempts) == expected


async def test_alias_fallback_models_replace_equivalents_and_skip_unknown_names() -> None:
    world = build_world(
        aliases=[alias("pool", dep("fake-a", "alpha"), fallbacks=["unknown-model", "pool", "gamma"])], retry=ONE_TRY
    )
    world["fake-a"].script("alpha-v1", Raise(http(503)))
    world["fake-c"].script("gamma-v1", Reply())
    response = await world.router.chat(chat_request("pool"), ctx())
    assert tried(response.attempts) == [f"{A}:PROVIDER_UNAVAILABLE", f"{C}:success"]  # not beta, alpha not twice


async def test_non_fallback_error_is_not_retried_on_equivalents() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Raise(http(400)))
    with pytest.raises(GatewayError) as raised:
        await world.router.chat(chat_request("alpha"), ctx())
    assert raised.value.reason is Reason.PROVIDER_REJECTED
    assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert world["fake-b"].calls == []


async def test_request_provider_restricts_an_alias() -> None:
    world = build_world(aliases=[alias("pool", dep("fake-a", "alpha"), dep("fake-b", "beta"))])
    world["fake-b"].script("beta-v1", Reply())
    response = await world.router.chat(chat_request("pool", routing=RoutingOptions(provider="fake-b")), ctx())
    assert response.provider == "fake-b"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        pytest.param("no-such-model", Reason.MODEL_NOT_FOUND, id="unknown-model"),
        pytest.param("unconfigured", Reason.PROVIDER_NOT_CONFIGURED, id="alias-of-unconfigured-provider"),
        pytest.param("gpt-4o-mini", Reason.PROVIDER_NOT_CONFIGURED, id="catalog-model-of-unconfigured-provider"),
    ],
)
async def test_resolution_errors(name: str, reason: Reason) -> None:
    world = build_world(aliases=[alias("unconfigured", dep("openai", "gpt-4o-mini"))])
    with pytest.raises(GatewayError) as raised:
        await world.router.chat(chat_request(name), ctx())
    assert raised.value.reason is reason


async def test_provider_slash_model_and_passthrough_reach_the_provider_unchanged() -> None:
    world = build_world(providers=["fake-a", FakeProvider("fake-p", passthrough=True)])
    world["fake-a"].script("custom-model", Reply())
    world["fake-p"].script("whatever-7b", Reply())
    first = await world.router.chat(chat_request("fake-a/custom-model"), ctx())
    second = await world.router.chat(chat_request("whatever-7b"), ctx())
    assert (first.provider, second.provider) == ("fake-a", "fake-p")
    assert not first.cost.priced  # not in the catalog: no price, no capability check


async def test_catalog_max_output_tokens_filled_for_providers_that_require_one() -> None:
    world = build_world(providers=[FakeProvider("fake-a", requires_max_output_tokens=True)])
    world["fake-a"].script("alpha-v1", Reply(), Reply())
    await world.router.chat(chat_request("alpha"), ctx())
    explicit = chat_request("alpha", generation=GenerationOptions(max_output_tokens=12))
    await world.router.chat(explicit, ctx())
    sent = [c.request.generation.max_output_tokens for c in world["fake-a"].calls]
    assert sent == [777, 12]


# --- capability checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_factory", "capability"),
    [
        pytest.param(lambda: image_request("alpha"), "image input", id="image-without-vision"),
        pytest.param(lambda: chat_request("alpha-vision", tools=(Tool("lookup"),)), "tools", id="tools"),
        pytest.param(
            lambda: chat_request(
                "alpha-vision", generation=GenerationOptions(response_format=ResponseFormat(type="json_object"))
            ),
            "JSON output",
            id="json-mode",
        ),
        pytest.param(lambda: chat_request("alpha-embed"), "chat", id="chat-on-embedding-model"),
    ],
)
async def test_capability_not_supported(request_factory, capability: str) -> None:
    world = build_world()
    request = request_factory()
    with pytest.raises(GatewayError) as raised:
        await world.router.chat(request, ctx())
    error = raised.value
    assert error.reason is Reason.CAPABILITY_NOT_SUPPORTED and error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata["provider"] == "fake-a"
    assert error.metadata["capability"] == capability
    assert error.metadata["model"] == request.model
    assert world["fake-a"].calls == []


async def test_capability_error_names_configured_alternatives_first() -> None:
    world = build_world()
    with pytest.raises(GatewayError) as raised:
        await world.router.chat(image_request("alpha"), ctx())
    alternatives = raised.value.message.split("models that do: ")[1].split(", ")
    assert alternatives[:2] == ["alpha-vision", "beta-vision"]  # fake providers are the configured ones
    assert len(alternatives) == 10


async def test_plan_leaves_out_deployments_without_the_capability() -> None:
    world = build_world(
        aliases=[alias("pool", dep("fake-a", "alpha"), dep("fake-b", "beta-vision"))],
        retry=ONE_TRY,
    )
    world["fake-b"].script("beta-vision-v1", Reply())
    response = await world.router.chat(image_request("pool"), ctx())
    assert tried(response.attempts) == ["fake-b/beta-vision-v1:success"]


async def test_fallbacks_without_the_capability_are_left_out() -> None:
    world = build_world(
        aliases=[alias("pool", dep("fake-a", "alpha-vision"), fallbacks=["alpha", "beta-vision"])], retry=ONE_TRY
    )
    world["fake-a"].script("alpha-vision-v1", Raise(http(503)))
    world["fake-b"].script("beta-vision-v1", Reply())
    response = await world.router.chat(image_request("pool"), ctx())
    assert tried(response.attempts) == [
        "fake-a/alpha-vision-v1:PROVIDER_UNAVAILABLE",
        "fake-b/beta-vision-v1:success",
    ]


# --- streams -------------------------------------------------------------------------------------


async def test_stream_deltas_then_final_with_usage_cost_attempts_and_tool_calls() -> None:
    world = build_world()
    deltas = (
        "Let me check",
        ChatDelta(tool_calls=(ToolCallDelta(0, id="call_w", name="weather", arguments='{"city":'),)),
        ChatDelta(tool_calls=(ToolCallDelta(0, arguments='"Paris"}'), ToolCallDelta(1, name="time"))),
        ChatDelta(tool_calls=(ToolCallDelta(1, arguments="{}"),)),
    )
    world["fake-a"].script("alpha-v1", Stream(deltas=deltas, usage=Usage(2000, 1000)))
    call = ctx(request_id="req-7")
    events = await collect(world, chat_request("alpha"), call)
    *streamed, final = events
    assert all(isinstance(e, ChatStreamDelta) for e in streamed) and len(streamed) == 4
    assert {(e.model, e.provider) for e in streamed} == {("alpha-v1", "fake-a")}
    assert streamed[0].delta.text == "Let me check"
    assert isinstance(final, ChatStreamFinal)
    assert (final.model, final.provider) == ("alpha-v1", "fake-a")
    assert final.usage == Usage(2000, 1000)
    assert final.cost.input_usd == pytest.approx(2000 * 1.0 / 1e6)
    assert final.cost.output_usd == pytest.approx(1000 * 2.0 / 1e6)
    assert tried(final.attempts) == [f"{A}:success"]
    assert final.tool_calls == (
        ToolCall("call_w", "weather", '{"city":"Paris"}'),
        ToolCall("call_req-7_1", "time", "{}"),  # no id upstream: one from the request id
    )
    assert final.provider_response_id == "resp-s"
    outcome = call.outcome
    assert outcome.completed and outcome.usage == final.usage and outcome.cost == final.cost
    assert outcome.attempts == final.attempts
    assert outcome.ttft_ms is not None and outcome.ttft_ms >= 0
    assert world.in_flight("alpha") == 0 and world["fake-a"].open_streams == 0


async def test_stream_usage_estimated_when_the_end_event_has_none() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Stream(deltas=("abcd", "efgh"), usage=None))
    *_, final = await collect(world, chat_request("alpha"), ctx())
    assert final.usage.estimated and final.usage.output_tokens == 2


async def test_stream_retry_and_fallback_before_the_first_event() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Raise(http(503)), Raise(http(429)))
    world["fake-b"].script("beta-v1", Stream(deltas=("ok",)))
    *streamed, final = await collect(world, chat_request("alpha"), ctx())
    assert [e.provider for e in streamed] == ["fake-b"]
    assert tried(final.attempts) == [f"{A}:PROVIDER_UNAVAILABLE", f"{A}:PROVIDER_RATE_LIMITED", f"{B}:success"]


async def test_stream_failure_after_content_through_the_router() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Stream(deltas=("a", "b"), end=http(503)))
    call = ctx()
    received = []
    with pytest.raises(GatewayError) as raised:
        async for event in world.router.chat_stream(chat_request("alpha"), call):
            received.append(event)
    error = raised.value
    assert len(received) == 2
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert error.metadata["chunks_sent"] == "2"
    assert (error.metadata["provider"], error.metadata["model"]) == ("fake-a", "alpha-v1")
    assert summary(error) == [f"{A}:PROVIDER_UNAVAILABLE"]
    assert not call.outcome.completed
    assert tried(call.outcome.attempts) == [f"{A}:PROVIDER_UNAVAILABLE"]
    assert world["fake-b"].calls == []
    assert world.in_flight("alpha") == 0


async def test_stream_consumer_stopping_early_releases_the_deployment() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Stream(deltas=("a", "b"), end=STALL))
    events = world.router.chat_stream(chat_request("alpha"), ctx())
    first = await anext(events)
    assert first.delta.text == "a"
    assert world.in_flight("alpha") == 1
    await events.aclose()
    assert world.in_flight("alpha") == 0 and world["fake-a"].open_streams == 0


async def test_stream_in_flight_while_connecting_through_the_router() -> None:
    world = build_world()
    gate = asyncio.Event()
    world["fake-a"].script("alpha-v1", Stream(deltas=("a",), gate=gate))
    events = world.router.chat_stream(chat_request("alpha"), ctx())
    first = asyncio.create_task(anext(events))
    await wait_for(world["fake-a"].entered)
    assert world.in_flight("alpha") == 1
    gate.set()
    assert (await first).delta.text == "a"
    assert world.in_flight("alpha") == 1
    rest = [e async for e in events]
    assert isinstance(rest[-1], ChatStreamFinal)
    assert world.in_flight("alpha") == 0


async def test_stream_capability_check_happens_before_any_call() -> None:
    world = build_world()
    with pytest.raises(GatewayError) as raised:
        await collect(world, image_request("alpha"), ctx())
    assert raised.value.reason is Reason.CAPABILITY_NOT_SUPPORTED
    assert world["fake-a"].calls == []


# --- strategies ----------------------------------------------------------------------------------


async def test_least_busy_prefers_the_deployment_with_fewer_in_flight() -> None:
    world = build_world(aliases=[alias("busy", dep("fake-a", "alpha"), dep("fake-b", "beta"), strategy="least_busy")])
    gate = asyncio.Event()
    world["fake-a"].script("alpha-v1", Stream(deltas=("a",), gate=gate))
    world["fake-b"].script("beta-v1", Reply(), Reply())
    connecting = world.router.chat_stream(chat_request("busy"), ctx())
    first = asyncio.create_task(anext(connecting))  # a stream connecting to fake-a (no event yet)
    await wait_for(world["fake-a"].entered)
    response = await world.router.chat(chat_request("busy"), ctx())
    assert response.provider == "fake-b"
    gate.set()
    assert (await first).provider == "fake-a"
    response = await world.router.chat(chat_request("busy"), ctx())  # fake-a still streaming
    assert response.provider == "fake-b"
    await connecting.aclose()
    world["fake-a"].script("alpha-v1", Reply())
    response = await world.router.chat(chat_request("busy"), ctx())  # both idle: alias order
    assert response.provider == "fake-a"


async def test_least_busy_counts_waiting_unary_calls() -> None:
    world = build_world(aliases=[alias("busy", dep("fake-a", "alpha"), dep("fake-b", "beta"), strategy="least_busy")])
    release = asyncio.Event()
    world["fake-a"].script("alpha-v1", Reply(wait=release))
    world["fake-b"].script("beta-v1", Reply())
    waiting = asyncio.create_task(world.router.chat(chat_request("busy"), ctx()))
    await wait_for(world["fake-a"].entered)
    assert (await world.router.chat(chat_request("busy"), ctx())).provider == "fake-b"
    release.set()
    assert (await waiting).provider == "fake-a"


LOWEST_COST_POOL = alias(
    "pool",
    dep("fake-c", "mystery"),  # not in the catalog: unpriced, last
    dep("fake-c", "gamma"),  # 4 + 8
    dep("fake-a", "alpha"),  # 1 + 2
    dep("fake-b", "beta"),  # 0.5 + 1
    strategy="lowest_cost",
)


@pytest.mark.parametrize(
    ("configured", "requested"),
    [
        pytest.param("lowest_cost", RoutingStrategy.CONFIGURED, id="alias-strategy"),
        pytest.param("priority", RoutingStrategy.LOWEST_COST, id="request-strategy"),
    ],
)
async def test_lowest_cost_orders_by_catalog_price(configured: str, requested: RoutingStrategy) -> None:
    pool = LOWEST_COST_POOL.model_copy(update={"strategy": configured})
    world = build_world(aliases=[pool], retry=ONE_TRY)
    world["fake-a"].script("alpha-v1", Raise(http(503)))
    world["fake-b"].script("beta-v1", Raise(http(503)))
    world["fake-c"].script("gamma-v1", Raise(http(503))).script("mystery", Raise(http(503)))
    with pytest.raises(GatewayError) as raised:
        await world.router.chat(chat_request("pool", routing=RoutingOptions(strategy=requested)), ctx())
    order = [entry.split(":")[0] for entry in summary(raised.value)]
    assert order == [B, A, C, "fake-c/mystery"]


async def test_least_latency_orders_by_measured_latency_unmeasured_first() -> None:
    world = build_world(
        aliases=[alias("pool", dep("fake-a", "alpha"), dep("fake-b", "beta"), dep("fake-c", "gamma"))], retry=ONE_TRY
    )
    slow, fast, _unmeasured = world.deployments("pool")
    world.states.get(slow).observe_latency(900.0)
    world.states.get(fast).observe_latency(800.0, ttft_ms=50.0)
    for name, provider_model in (("fake-a", "alpha-v1"), ("fake-b", "beta-v1"), ("fake-c", "gamma-v1")):
        world[name].script(provider_model, Raise(http(503)))
    routing = RoutingOptions(strategy=RoutingStrategy.LEAST_LATENCY)
    with pytest.raises(GatewayError) as raised:
        await world.router.chat(chat_request("pool", routing=routing), ctx())
    assert [entry.split(":")[0] for entry in summary(raised.value)] == [C, B, A]


async def _weighted_picks(seed: int, calls: int = 30) -> list[str]:
    world = build_world(
        aliases=[alias("w", dep("fake-a", "alpha", weight=1), dep("fake-b", "beta", weight=9), strategy="weighted")],
        seed=seed,
    )
    world["fake-a"].script("alpha-v1", *[Reply()] * calls)
    world["fake-b"].script("beta-v1", *[Reply()] * calls)
    return [(await world.router.chat(chat_request("w"), ctx())).provider for _ in range(calls)]


async def test_weighted_with_a_seeded_rng_is_deterministic() -> None:
    first, again = await _weighted_picks(0), await _weighted_picks(0)
    assert first == again
    assert {"fake-a", "fake-b"} == set(first)  # both get traffic
    assert first.count("fake-b") > first.count("fake-a") * 2  # weight 9 against 1


# --- embeddings ----------------------------------------------------------------------------------


async def test_embed_answer_usage_cost_and_outcome() -> None:
    world = build_world()
    world["fake-a"].script("alpha-embed-v1", Reply(usage=Usage(input_tokens=2000), vectors=((1.0, 0.0), (0.0, 1.0))))
    call = ctx(request_id="req-e")
    response = await world.router.embed(EmbedRequest("alpha-embed", ("one", "two", "three")), call)
    assert (response.id, response.model, response.provider) == ("req-e", "alpha-embed-v1", "fake-a")
    assert response.vectors == ((1.0, 0.0), (0.0, 1.0), (1.0, 0.0))
    assert response.usage == Usage(input_tokens=2000)
    assert response.cost.input_usd == pytest.approx(2000 * 0.1 / 1e6)
    assert tried(response.attempts) == ["fake-a/alpha-embed-v1:success"]
    assert call.outcome.completed and call.outcome.usage == response.usage


async def test_embed_usage_estimated_without_provider_counts() -> None:
    world = build_world()
    world["fake-a"].script("alpha-embed-v1", Reply(usage=Usage()))
    response = await world.router.embed(EmbedRequest("alpha-embed", ("12345678",)), ctx())
    assert response.usage == Usage(input_tokens=2, estimated=True)


async def test_embed_falls_back_to_an_equivalent_embedding_model() -> None:
    world = build_world(retry=ONE_TRY)
    world["fake-a"].script("alpha-embed-v1", Raise(http(503)))
    world["fake-b"].script("beta-embed-v1", Reply())
    response = await world.router.embed(EmbedRequest("alpha-embed", ("x",)), ctx())
    assert response.provider == "fake-b"
    assert tried(response.attempts) == ["fake-a/alpha-embed-v1:PROVIDER_UNAVAILABLE", "fake-b/beta-embed-v1:success"]


@pytest.mark.parametrize(
    ("provider", "model_name"),
    [
        pytest.param(FakeProvider("fake-a"), "alpha", id="chat-model"),
        pytest.param(FakeProvider("fake-a", supports_embeddings=False), "alpha-embed", id="provider-cannot-embed"),
    ],
)
async def test_embed_capability_not_supported(provider: FakeProvider, model_name: str) -> None:
    world = build_world(providers=[provider])
    with pytest.raises(GatewayError) as raised:
        await world.router.embed(EmbedRequest(model_name, ("x",)), ctx())
    error = raised.value
    assert error.reason is Reason.CAPABILITY_NOT_SUPPORTED and error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert (error.metadata["capability"], error.metadata["provider"]) == ("embeddings", "fake-a")
    assert error.message.split("models that do: ")[1].startswith("alpha-embed")  # configured provider's first
    assert provider.calls == []


# --- token counts --------------------------------------------------------------------------------


async def test_count_tokens_default_estimate_on_the_first_deployment() -> None:
    world = build_world(aliases=[alias("pool", dep("fake-b", "beta"), dep("fake-a", "alpha"))])
    call = ctx()
    count = await world.router.count_tokens(chat_request("pool", text="x" * 40), call)
    assert count.method is TokenCountMethod.ESTIMATE and count.input_tokens > 0
    assert count.provider == "fake-b"
    assert (call.outcome.provider, call.outcome.model, call.outcome.completed) == ("fake-b", "beta-v1", True)


async def test_count_tokens_from_the_provider() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Reply(usage=Usage(input_tokens=123)))
    count = await world.router.count_tokens(chat_request("alpha"), ctx())
    assert (count.input_tokens, count.method) == (123, TokenCountMethod.PROVIDER)


@pytest.mark.parametrize(
    ("timeout_s", "step"),
    [
        pytest.param(-1.0, None, id="deadline-already-passed"),
        pytest.param(0.05, Hang(), id="provider-hangs"),
    ],
)
async def test_count_tokens_deadline(timeout_s: float, step) -> None:
    world = build_world()
    if step is not None:
        world["fake-a"].script("alpha-v1", step)
    call = ctx(timeout_s)
    with pytest.raises(GatewayError) as raised:
        await world.router.count_tokens(chat_request("alpha"), call)
    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert (call.outcome.provider, call.outcome.completed) == ("fake-a", False)


async def test_count_tokens_provider_error_gets_deployment_metadata() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Raise(http(503)))
    with pytest.raises(GatewayError) as raised:
        await world.router.count_tokens(chat_request("alpha"), ctx())
    assert raised.value.reason is Reason.PROVIDER_UNAVAILABLE
    assert (raised.value.metadata["provider"], raised.value.metadata["model"]) == ("fake-a", "alpha-v1")


# --- the fake itself -----------------------------------------------------------------------------


async def test_fake_list_models_and_aclose() -> None:
    world = build_world(providers=[FakeProvider("fake-a", live_models=(LiveModel("alpha-v1"),))])
    assert await world["fake-a"].list_models(1.0) == (LiveModel("alpha-v1"),)
    await world.registry.aclose()
    assert world["fake-a"].closed


async def test_fake_refuses_unscripted_calls() -> None:
    world = build_world()
    with pytest.raises(AssertionError, match="unscripted chat call to fake-a/alpha-v1"):
        await world.router.chat(chat_request("alpha"), ctx())
    assert world.in_flight("alpha") == 0
