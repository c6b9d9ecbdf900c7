"""`routing/executor.py` against the in-process fake provider: the attempt loop (retries,
retry-after, fallback, deadlines, attempt timeouts, breakers, per-deployment limits), in-flight
accounting, and the committed stream (idle timeout, failure after content, missing end event).

No gRPC, no HTTP: the real catalog, resolver, deployment states (fake clock) and executor are
wired over `tests/unit/fakes.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest

from llm_gateway_server.config import BreakerSettings, RetrySettings
from llm_gateway_server.domain import AttemptOutcome, ChatDelta, ProviderChatResult, ProviderStreamEnd
from llm_gateway_server.errors import GatewayError, Reason, attempt_timeout
from llm_gateway_server.providers.errors import bad_response, connection_failed, from_http_status, upstream_timeout
from llm_gateway_server.routing.breaker import BreakerState
from llm_gateway_server.routing.executor import CommittedStream, counts_against_breaker
from llm_gateway_server.routing.resolver import Deployment

from .fakes import (
    STALL,
    STOP,
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
    summary,
    wait_for,
)

REQUEST = chat_request()
A, B = "fake-a/alpha-v1", "fake-b/beta-v1"
ONE_SHOT_BREAKER = BreakerSettings(consecutive_failures=1, min_calls=100, cooldown_s=7.0)


def http(status: int, **kw: object):
    """An error factory: the adapters' mapping of HTTP `status` for the deployment called."""
    return lambda provider, model: from_http_status(provider, model, status, "x", **kw)  # type: ignore[arg-type]


def chat(deployment: Deployment, timeout_s: float) -> Awaitable[ProviderChatResult]:
    return deployment.provider.chat(REQUEST, deployment.provider_model, timeout_s)


def start(deployment: Deployment, timeout_s: float) -> AsyncIterator[ChatDelta | ProviderStreamEnd]:
    return deployment.provider.chat_stream(REQUEST, deployment.provider_model, timeout_s)


def plan(world: World, *names: str) -> list[Deployment]:
    return [world.deployment(n) for n in names]


def outcomes(attempts) -> list[tuple[str, AttemptOutcome, str]]:
    return [(f"{a.provider}/{a.model}", a.outcome, a.error_reason) for a in attempts]


async def drain(stream: CommittedStream) -> list[ChatDelta | ProviderStreamEnd]:
    events = []
    try:
        async for event in stream:
            events.append(event)
    finally:
        await stream.aclose()
    return events


async def settle() -> None:
    """Lets started tasks run up to their next real wait."""
    for _ in range(5):
        await asyncio.sleep(0)


# --- unary: the attempt loop ---------------------------------------------------------------------


async def test_success_on_first_try() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Reply(text="hi there"))
    call = ctx()
    done = await world.executor.run(plan(world, "alpha", "beta"), call, 10, chat)
    assert done.result.text == "hi there"
    assert done.deployment.key == A
    assert outcomes(done.attempts) == [(A, AttemptOutcome.SUCCESS, "")]
    assert call.outcome.attempts == done.attempts
    assert (call.outcome.provider, call.outcome.model) == ("fake-a", "alpha-v1")
    state = world.states.get(done.deployment)
    assert state.in_flight == 0 and state.latency_ms is not None
    assert world["fake-b"].calls == []
    assert 0 < world["fake-a"].calls[0].timeout_s <= world.settings.attempt_timeout_s


@pytest.mark.parametrize(
    ("error", "reason", "upstream_status"),
    [
        pytest.param(http(503), "PROVIDER_UNAVAILABLE", 503, id="503"),
        pytest.param(http(500), "PROVIDER_UNAVAILABLE", 500, id="500"),
        pytest.param(http(429, retry_after_s=0.0), "PROVIDER_RATE_LIMITED", 429, id="429-retry-after-0"),
        pytest.param(http(408), "PROVIDER_UNAVAILABLE", 408, id="408"),
        pytest.param(lambda p, m: connection_failed(p, m, "reset"), "PROVIDER_UNAVAILABLE", 0, id="connection"),
        pytest.param(lambda p, m: upstream_timeout(p, m, 1.0), "PROVIDER_UNAVAILABLE", 0, id="upstream-timeout"),
        pytest.param(lambda p, m: bad_response(p, m, "junk"), "PROVIDER_BAD_RESPONSE", 0, id="bad-response"),
    ],
)
async def test_retryable_error_then_success_on_retry(error, reason: str, upstream_status: int) -> None:
    world = build_world(retry=RetrySettings(max_attempts=3, base_delay_s=0, max_delay_s=0))
    world["fake-a"].script("alpha-v1", Raise(error), Reply())
    done = await world.executor.run(plan(world, "alpha", "beta"), ctx(), 10, chat)
    assert outcomes(done.attempts) == [(A, AttemptOutcome.ERROR, reason), (A, AttemptOutcome.SUCCESS, "")]
    assert done.attempts[0].upstream_status == upstream_status
    assert done.deployment.key == A
    assert world["fake-b"].calls == []


@pytest.mark.parametrize(
    ("retry_after_s", "expected"),
    [
        pytest.param(0.01, [(A, "PROVIDER_RATE_LIMITED"), (A, "success")], id="short-wait-retries-same"),
        pytest.param(30.0, [(A, "PROVIDER_RATE_LIMITED"), (B, "success")], id="long-wait-moves-on"),
    ],
)
async def test_retry_after_beyond_max_moves_on_to_next_deployment(retry_after_s: float, expected) -> None:
    world = build_world(retry=RetrySettings(max_attempts=3, base_delay_s=0, max_delay_s=0, max_retry_after_s=1.0))
    world["fake-a"].script("alpha-v1", Raise(http(429, retry_after_s=retry_after_s)), Reply())
    world["fake-b"].script("beta-v1", Reply())
    done = await world.executor.run(plan(world, "alpha", "beta"), ctx(), 10, chat)
    assert [(f"{a.provider}/{a.model}", a.error_reason or a.outcome.value) for a in done.attempts] == expected


async def test_retries_exhausted_then_next_deployment() -> None:
    world = build_world(retry=RetrySettings(max_attempts=2, base_delay_s=0, max_delay_s=0))
    world["fake-a"].script("alpha-v1", Raise(http(503)), Raise(http(503)))
    world["fake-b"].script("beta-v1", Reply())
    done = await world.executor.run(plan(world, "alpha", "beta"), ctx(), 10, chat)
    assert outcomes(done.attempts) == [
        (A, AttemptOutcome.ERROR, "PROVIDER_UNAVAILABLE"),
        (A, AttemptOutcome.ERROR, "PROVIDER_UNAVAILABLE"),
        (B, AttemptOutcome.SUCCESS, ""),
    ]
    assert world.in_flight("alpha") == world.in_flight("beta") == 0


async def test_plan_exhausted_raises_last_error_with_attempts_summary() -> None:
    world = build_world(retry=RetrySettings(max_attempts=2, base_delay_s=0, max_delay_s=0))
    world["fake-a"].script("alpha-v1", Raise(http(503)), Raise(http(502)))
    world["fake-b"].script("beta-v1", Raise(http(429)), Raise(http(500)))
    call = ctx()
    with pytest.raises(GatewayError) as raised:
        await world.executor.run(plan(world, "alpha", "beta"), call, 10, chat)
    error = raised.value
    assert error.reason is Reason.PROVIDER_UNAVAILABLE and error.code is grpc.StatusCode.UNAVAILABLE
    assert error.metadata["upstream_status"] == "500"  # the last error
    assert (error.metadata["provider"], error.metadata["model"]) == ("fake-b", "beta-v1")
    assert summary(error) == [
        f"{A}:PROVIDER_UNAVAILABLE",
        f"{A}:PROVIDER_UNAVAILABLE",
        f"{B}:PROVIDER_RATE_LIMITED",
        f"{B}:PROVIDER_UNAVAILABLE",
    ]
    assert len(call.outcome.attempts) == 4
    assert (call.outcome.provider, call.outcome.model) == ("fake-b", "beta-v1")


@pytest.mark.parametrize(
    ("status", "upstream_code", "reason"),
    [
        pytest.param(400, "", Reason.PROVIDER_REJECTED, id="400"),
        pytest.param(413, "", Reason.PROVIDER_REJECTED, id="413"),
        pytest.param(422, "", Reason.PROVIDER_REJECTED, id="422"),
        pytest.param(400, "context_length_exceeded", Reason.PROVIDER_REJECTED, id="context-length"),
        pytest.param(400, "content_filter", Reason.CONTENT_FILTERED, id="content-filter"),
    ],
)
async def test_non_fallback_error_ends_the_call_at_once(status: int, upstream_code: str, reason: Reason) -> None:
    world = build_world(retry=RetrySettings(max_attempts=3, base_delay_s=0, max_delay_s=0))
    world["fake-a"].script("alpha-v1", Raise(http(status, upstream_code=upstream_code)))
    with pytest.raises(GatewayError) as raised:
        await world.executor.run(plan(world, "alpha", "beta"), ctx(), 10, chat)
    error = raised.value
    assert error.reason is reason and error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert summary(error) == [f"{A}:{reason.value}"]
    assert len(world["fake-a"].calls) == 1 and world["fake-b"].calls == []
    assert world.in_flight("alpha") == 0


@pytest.mark.parametrize("status", [401, 402, 403, 404])
async def test_fallback_error_that_is_not_retryable_moves_on_without_retry(status: int) -> None:
    world = build_world(retry=RetrySettings(max_attempts=3, base_delay_s=0, max_delay_s=0))
    world["fake-a"].script("alpha-v1", Raise(http(status)))
    world["fake-b"].script("beta-v1", Reply())
    done = await world.executor.run(plan(world, "alpha", "beta"), ctx(), 10, chat)
    assert [a.outcome for a in done.attempts] == [AttemptOutcome.ERROR, AttemptOutcome.SUCCESS]
    assert done.attempts[0].upstream_status == status
    assert len(world["fake-a"].calls) == 1


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        pytest.param(http(503), True, id="503"),
        pytest.param(http(429), True, id="429"),
        pytest.param(http(401), True, id="401-auth"),
        pytest.param(lambda p, m: bad_response(p, m, "junk"), True, id="bad-response"),
        pytest.param(lambda p, m: attempt_timeout(p, m, 1.0, stalled=False), True, id="provider-timeout"),
        pytest.param(http(400), False, id="400-rejected"),
        pytest.param(http(404), False, id="404-model"),
        pytest.param(http(400, upstream_code="content_filter"), False, id="content-filter"),
    ],
)
async def test_which_failures_count_against_the_breaker(error, counts: bool) -> None:
    world = build_world(breaker=ONE_SHOT_BREAKER, retry=RetrySettings(max_attempts=1))
    world["fake-a"].script("alpha-v1", Raise(error))
    with pytest.raises(GatewayError) as raised:
        await world.executor.run(plan(world, "alpha"), ctx(), 10, chat)
    assert counts_against_breaker(raised.value) is counts
    expected = BreakerState.OPEN if counts else BreakerState.CLOSED
    assert world.states.breaker_state(A) is expected


async def test_deadline_passing_ends_with_deadline_exceeded_and_no_fallback() -> None:
    world = build_world(attempt_timeout_s=2.0)
    world["fake-a"].script("alpha-v1", Hang())
    loop = asyncio.get_running_loop()
    began = loop.time()
    call = ctx(0.05)
    with pytest.raises(GatewayError) as raised:
        await world.executor.run(plan(world, "alpha", "beta"), call, 10, chat)
    error = raised.value
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED and error.reason is Reason.DEADLINE_EXCEEDED
    assert (error.metadata["provider"], error.metadata["model"]) == ("fake-a", "alpha-v1")
    assert summary(error) == [f"{A}:DEADLINE_EXCEEDED"]
    assert loop.time() - began < 1.0
    assert world["fake-b"].calls == []
    assert world.in_flight("alpha") == 0
    assert world.states.breaker_state(A) is BreakerState.CLOSED  # the caller's deadline is not the deployment's fault


async def test_upstream_timeout_at_the_deadline_reads_deadline_exceeded() -> None:
    world = build_world()
    deadline_passed = asyncio.Event()
    world["fake-a"].script("alpha-v1", Raise(lambda p, m: upstream_timeout(p, m, 0.05), wait=deadline_passed))
    call = ctx(0.05)
    # the provider's own timeout fires just inside the deadline's slack, before the executor's timer
    asyncio.get_running_loop().call_at(call.deadline - 0.004, deadline_passed.set)
    with pytest.raises(GatewayError) as raised:
        await world.executor.run(plan(world, "alpha", "beta"), call, 10, chat)
    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_attempt_timeout_is_provider_timeout_then_next_deployment() -> None:
    world = build_world(attempt_timeout_s=0.05, retry=RetrySettings(max_attempts=1), breaker=ONE_SHOT_BREAKER)
    world["fake-a"].script("alpha-v1", Hang())
    world["fake-b"].script("beta-v1", Reply())
    done = await world.executor.run(plan(world, "alpha", "beta"), ctx(5.0), 10, chat)
    assert outcomes(done.attempts) == [
        (A, AttemptOutcome.ERROR, "PROVIDER_TIMEOUT"),
        (B, AttemptOutcome.SUCCESS, ""),
    ]
    assert done.attempts[0].latency_ms >= 40
    assert world["fake-a"].calls[0].timeout_s <= 0.05
    assert world.states.breaker_state(A) is BreakerState.OPEN
    assert world.in_flight("alpha") == 0


async def test_attempt_budget_never_exceeds_the_remaining_deadline() -> None:
    world = build_world(attempt_timeout_s=60.0)
    world["fake-a"].script("alpha-v1", Reply())
    await world.executor.run(plan(world, "alpha"), ctx(0.5), 10, chat)
    assert world["fake-a"].calls[0].timeout_s <= 0.5


# --- breakers and per-deployment limits ----------------------------------------------------------


async def test_every_breaker_open_is_circuit_open_with_cooldown_retry_info() -> None:
    world = build_world(breaker=ONE_SHOT_BREAKER)
    deployments = plan(world, "alpha", "beta")
    for d in deployments:
        world.states.record(d, success=False)
    call = ctx()
    with pytest.raises(GatewayError) as raised:
        await world.executor.run(deployments, call, 10, chat)
    error = raised.value
    assert error.reason is Reason.CIRCUIT_OPEN and error.code is grpc.StatusCode.UNAVAILABLE
    assert error.retry_after_s == 7.0
    assert (error.metadata["provider"], error.metadata["model"]) == ("fake-a", "alpha-v1")
    assert summary(error) == [f"{A}:CIRCUIT_OPEN", f"{B}:CIRCUIT_OPEN"]
    assert world["fake-a"].calls == [] and world["fake-b"].calls == []

    world.clock.advance(7.0)  # cooldown over: half-open, one trial call
    world["fake-a"].script("alpha-v1", Reply())
    done = await world.executor.run(deployments, ctx(), 10, chat)
    assert done.deployment.key == A
    assert world.states.breaker_state(A) is BreakerState.CLOSED


async def test_open_breaker_is_skipped_for_the_next_deployment() -> None:
    world = build_world(breaker=ONE_SHOT_BREAKER)
    deployments = plan(world, "alpha", "beta")
    world.states.record(deployments[0], success=False)
    world["fake-b"].script("beta-v1", Reply())
    done = await world.executor.run(deployments, ctx(), 10, chat)
    assert outcomes(done.attempts) == [(A, AttemptOutcome.SKIPPED, "CIRCUIT_OPEN"), (B, AttemptOutcome.SUCCESS, "")]
    assert done.attempts[0].latency_ms == 0.0


async def test_deployment_rpm_limit_skips_to_the_next_deployment() -> None:
    world = build_world(aliases=[alias("pool", dep("fake-a", "alpha", rpm=1), dep("fake-b", "beta"))])
    world["fake-a"].script("alpha-v1", Reply(), Reply())
    world["fake-b"].script("beta-v1", Reply())
    deployments = list(world.deployments("pool"))
    first = await world.executor.run(deployments, ctx(), 10, chat)
    assert first.deployment.key == A
    second = await world.executor.run(deployments, ctx(), 10, chat)
    assert outcomes(second.attempts) == [
        (A, AttemptOutcome.SKIPPED, "DEPLOYMENT_RATE_LIMITED"),
        (B, AttemptOutcome.SUCCESS, ""),
    ]
    world.clock.advance(60.0)  # the minute window moved on
    third = await world.executor.run(deployments, ctx(), 10, chat)
    assert outcomes(third.attempts) == [(A, AttemptOutcome.SUCCESS, "")]


async def test_deployment_limits_on_every_deployment_is_circuit_open() -> None:
    world = build_world(aliases=[alias("pool", dep("fake-a", "alpha", tpm=100))])
    with pytest.raises(GatewayError) as raised:
        await world.executor.run(list(world.deployments("pool")), ctx(), 500, chat)  # 500 tokens > 100 tpm
    assert raised.value.reason is Reason.CIRCUIT_OPEN
    assert summary(raised.value) == [f"{A}:DEPLOYMENT_RATE_LIMITED"]
    assert world["fake-a"].calls == []


# Found by this test, fixed since: it was a strict xfail.
async def test_half_open_trial_slot_is_not_lost_to_a_rate_limited_skip() -> None:
    world = build_world(
        aliases=[alias("pool", dep("fake-a", "alpha", rpm=1))],
        breaker=ONE_SHOT_BREAKER,
        retry=RetrySettings(max_attempts=1),
    )
    deployments = list(world.deployments("pool"))
    world["fake-a"].script("alpha-v1", Raise(http(503)), Reply())
    with pytest.raises(GatewayError):
        await world.executor.run(deployments, ctx(), 10, chat)  # opens the breaker, uses the minute's request
    world.clock.advance(7.0)  # cooldown over (half-open) but the rpm window still full
    with pytest.raises(GatewayError) as raised:
        await world.executor.run(deployments, ctx(), 10, chat)
    assert summary(raised.value) == [f"{A}:DEPLOYMENT_RATE_LIMITED"]
    world.clock.advance(60.0)  # the rpm window is free again: the trial call must go through
    done = await world.executor.run(deployments, ctx(), 10, chat)
    assert done.deployment.key == A


# Found by this test, fixed since: it was a strict xfail.
async def test_half_open_trial_slot_is_not_lost_to_a_cancelled_call() -> None:
    world = build_world(breaker=ONE_SHOT_BREAKER, retry=RetrySettings(max_attempts=1))
    deployments = plan(world, "alpha")
    world.states.record(deployments[0], success=False)
    world.clock.advance(7.0)  # half-open
    world["fake-a"].script("alpha-v1", Hang(), Reply())
    task = asyncio.create_task(world.executor.run(deployments, ctx(), 10, chat))
    await wait_for(world["fake-a"].entered)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    world.clock.advance(60.0)  # any cooldown is long over
    done = await world.executor.run(deployments, ctx(), 10, chat)
    assert done.deployment.key == A


# --- in-flight accounting: unary -----------------------------------------------------------------


@pytest.mark.parametrize("ending", ["answer", "error", "cancel"])
async def test_unary_in_flight_while_waiting_and_released_after(ending: str) -> None:
    world = build_world(retry=RetrySettings(max_attempts=1))
    release = asyncio.Event()
    step = Raise(http(400), wait=release) if ending == "error" else Reply(wait=release)
    world["fake-a"].script("alpha-v1", step)
    task = asyncio.create_task(world.executor.run(plan(world, "alpha"), ctx(), 10, chat))
    await wait_for(world["fake-a"].entered)
    assert world.in_flight("alpha") == 1
    if ending == "cancel":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        release.set()
        if ending == "error":
            with pytest.raises(GatewayError):
                await task
        else:
            await task
    assert world.in_flight("alpha") == 0


async def test_in_flight_released_after_each_failed_attempt() -> None:
    world = build_world(retry=RetrySettings(max_attempts=2, base_delay_s=0, max_delay_s=0))
    seen: list[tuple[int, int]] = []
    deployments = plan(world, "alpha", "beta")

    async def observed(deployment: Deployment, timeout_s: float) -> ProviderChatResult:
        seen.append((world.states.get(deployments[0]).in_flight, world.states.get(deployments[1]).in_flight))
        return await chat(deployment, timeout_s)

    world["fake-a"].script("alpha-v1", Raise(http(503)), Raise(http(503)))
    world["fake-b"].script("beta-v1", Reply())
    await world.executor.run(deployments, ctx(), 10, observed)
    assert seen == [(1, 0), (1, 0), (0, 1)]
    assert world.in_flight("alpha") == world.in_flight("beta") == 0


# --- streams: opening (retries and fallbacks before the first event) -----------------------------


async def test_stream_success_yields_every_event_and_records_success() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Stream(deltas=("a", "b", "c")))
    call = ctx()
    stream = await world.executor.stream(plan(world, "alpha", "beta"), call, 10, start)
    assert stream.deployment.key == A
    assert outcomes(stream.attempts) == []  # the success is recorded with the end event
    events = await drain(stream)
    assert [e.text for e in events[:-1]] == ["a", "b", "c"]
    assert isinstance(events[-1], ProviderStreamEnd)
    assert outcomes(stream.attempts) == [(A, AttemptOutcome.SUCCESS, "")]
    assert call.outcome.ttft_ms == stream.ttft_ms and stream.ttft_ms >= 0
    state = world.states.get(stream.deployment)
    assert state.ttft_ms is not None and state.latency_ms is not None
    assert world["fake-a"].open_streams == 0


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        pytest.param(Raise(http(503)), "PROVIDER_UNAVAILABLE", id="503-at-open"),
        pytest.param(Raise(lambda p, m: connection_failed(p, m, "refused")), "PROVIDER_UNAVAILABLE", id="connect"),
        pytest.param(Stream(deltas=(), end=STOP), "PROVIDER_BAD_RESPONSE", id="ended-before-any-event"),
        pytest.param(Stream(deltas=(), end=http(503)), "PROVIDER_UNAVAILABLE", id="error-event-first"),
    ],
)
async def test_stream_retries_before_the_first_event(first, reason: str) -> None:
    world = build_world(retry=RetrySettings(max_attempts=2, base_delay_s=0, max_delay_s=0))
    world["fake-a"].script("alpha-v1", first, Stream(deltas=("ok",)))
    stream = await world.executor.stream(plan(world, "alpha", "beta"), ctx(), 10, start)
    events = await drain(stream)
    assert events[0] == ChatDelta(text="ok")
    assert outcomes(stream.attempts) == [(A, AttemptOutcome.ERROR, reason), (A, AttemptOutcome.SUCCESS, "")]
    assert world["fake-a"].open_streams == 0 and world["fake-a"].closed_streams == 2


async def test_stream_falls_back_before_the_first_event() -> None:
    world = build_world(attempt_timeout_s=0.05, retry=RetrySettings(max_attempts=1))
    world["fake-a"].script("alpha-v1", Stream(gate=asyncio.Event()))  # never opens
    world["fake-b"].script("beta-v1", Stream(deltas=("from b",)))
    stream = await world.executor.stream(plan(world, "alpha", "beta"), ctx(), 10, start)
    events = await drain(stream)
    assert stream.deployment.key == B and events[0].text == "from b"
    assert outcomes(stream.attempts) == [(A, AttemptOutcome.ERROR, "PROVIDER_TIMEOUT"), (B, AttemptOutcome.SUCCESS, "")]
    assert world["fake-a"].open_streams == 0  # the timed-out upstream was closed
    assert world.in_flight("alpha") == world.in_flight("beta") == 0


@pytest.mark.parametrize(
    ("step", "code", "reason"),
    [
        pytest.param(Raise(http(400)), grpc.StatusCode.INVALID_ARGUMENT, Reason.PROVIDER_REJECTED, id="400"),
        pytest.param(
            Raise(http(429, retry_after_s=99.0)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.PROVIDER_RATE_LIMITED,
            id="429-long-retry-after",
        ),
        pytest.param(Raise(http(401)), grpc.StatusCode.INTERNAL, Reason.PROVIDER_AUTH_FAILED, id="401"),
    ],
)
async def test_stream_failure_before_content_keeps_its_own_code(step, code, reason) -> None:
    world = build_world(retry=RetrySettings(max_attempts=1))
    world["fake-a"].script("alpha-v1", step)
    with pytest.raises(GatewayError) as raised:
        await world.executor.stream(plan(world, "alpha"), ctx(), 10, start)
    error = raised.value
    assert error.code is code and error.reason is reason
    assert error.metadata["chunks_sent"] == "0"
    assert summary(error) == [f"{A}:{reason.value}"]
    assert world.in_flight("alpha") == 0


async def test_stream_deadline_before_first_event() -> None:
    world = build_world()
    world["fake-a"].script("alpha-v1", Stream(gate=asyncio.Event()))
    with pytest.raises(GatewayError) as raised:
        await world.executor.stream(plan(world, "alpha", "beta"), ctx(0.05), 10, start)
    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert raised.value.metadata["chunks_sent"] == "0"
    assert world["fake-b"].calls == []


# --- streams: after the commit -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason", "counts"),
    [
        pytest.param(http(503), Reason.PROVIDER_UNAVAILABLE, True, id="503"),
        pytest.param(http(429), Reason.PROVIDER_RATE_LIMITED, True, id="429"),
        pytest.param(lambda p, m: connection_failed(p, m, "reset"), Reason.PROVIDER_UNAVAILABLE, True, id="drop"),
        pytest.param(http(400), Reason.PROVIDER_REJECTED, False, id="400-in-stream"),
    ],
)
async def test_stream_failure_after_content_is_unavailable_with_chunks_sent(error, reason, counts) -> None:
    world = build_world(breaker=ONE_SHOT_BREAKER)
    world["fake-a"].script("alpha-v1", Stream(deltas=("a", "b", "c"), end=error))
    stream = await world.executor.stream(plan(world, "alpha", "beta"), ctx(), 10, start)
    received = []
    with pytest.raises(GatewayError) as raised:
        async for event in stream:
            received.append(event)
    failure = raised.value
    assert len(received) == 3
    assert failure.code is grpc.StatusCode.UNAVAILABLE and failure.reason is reason
    assert failure.metadata["chunks_sent"] == "3"
    assert (failure.metadata["provider"], failure.metadata["model"]) == ("fake-a", "alpha-v1")
    assert summary(failure) == [f"{A}:{reason.value}"]
    assert world.states.breaker_state(A) is (BreakerState.OPEN if counts else BreakerState.CLOSED)
    assert world["fake-b"].calls == []  # no fallback once content was sent
    assert world.in_flight("alpha") == 0 and world["fake-a"].open_streams == 0


async def test_stream_stall_beyond_idle_timeout_is_provider_timeout() -> None:
    world = build_world(stream_idle_timeout_s=0.05, breaker=ONE_SHOT_BREAKER)
    world["fake-a"].script("alpha-v1", Stream(deltas=("a", "b"), end=STALL))
    stream = await world.executor.stream(plan(world, "alpha"), ctx(5.0), 10, start)
    with pytest.raises(GatewayError) as raised:
        await drain(stream)
    failure = raised.value
    assert failure.reason is Reason.PROVIDER_TIMEOUT and failure.code is grpc.StatusCode.UNAVAILABLE
    assert failure.metadata["chunks_sent"] == "2"
    assert failure.metadata["failure"] == "stalled"
    assert world.states.breaker_state(A) is BreakerState.OPEN
    assert world.in_flight("alpha") == 0 and world["fake-a"].open_streams == 0


async def test_stream_deadline_while_streaming_keeps_deadline_exceeded() -> None:
    world = build_world(stream_idle_timeout_s=2.0)
    world["fake-a"].script("alpha-v1", Stream(deltas=("a",), end=STALL))
    stream = await world.executor.stream(plan(world, "alpha"), ctx(0.05), 10, start)
    with pytest.raises(GatewayError) as raised:
        await drain(stream)
    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert raised.value.metadata["chunks_sent"] == "1"


@pytest.mark.parametrize(
    "deltas",
    [
        pytest.param(1, id="1-delta"),
        pytest.param(3, id="3-deltas"),  # found by this test (fixed): chunks_sent was always "1"
    ],
)
async def test_stream_ending_without_end_event_is_bad_response(deltas: int) -> None:
    world = build_world(breaker=ONE_SHOT_BREAKER)
    world["fake-a"].script("alpha-v1", Stream(deltas=("x",) * deltas, end=STOP))
    stream = await world.executor.stream(plan(world, "alpha"), ctx(), 10, start)
    with pytest.raises(GatewayError) as raised:
        await drain(stream)
    failure = raised.value
    assert failure.reason is Reason.PROVIDER_BAD_RESPONSE and failure.code is grpc.StatusCode.UNAVAILABLE
    assert world.states.breaker_state(A) is BreakerState.OPEN
    assert world.in_flight("alpha") == 0
    assert failure.metadata["chunks_sent"] == str(deltas)


# --- in-flight accounting: streams ---------------------------------------------------------------


async def test_stream_in_flight_while_connecting_and_while_iterating() -> None:
    world = build_world()
    gate = asyncio.Event()
    world["fake-a"].script("alpha-v1", Stream(deltas=("a", "b"), gate=gate))
    opening = asyncio.create_task(world.executor.stream(plan(world, "alpha"), ctx(), 10, start))
    await wait_for(world["fake-a"].entered)
    await settle()
    assert world.in_flight("alpha") == 1  # connecting: no event yet
    gate.set()
    stream = await opening
    assert world.in_flight("alpha") == 1
    iterator = aiter(stream)
    assert (await anext(iterator)).text == "a"
    assert world.in_flight("alpha") == 1
    assert (await anext(iterator)).text == "b"
    assert isinstance(await anext(iterator), ProviderStreamEnd)
    assert world.in_flight("alpha") == 1  # the consumer has not asked past the end yet
    with pytest.raises(StopAsyncIteration):
        await anext(iterator)
    assert world.in_flight("alpha") == 0
    await stream.aclose()  # idempotent
    assert world.in_flight("alpha") == 0


@pytest.mark.parametrize(
    ("step", "consume"),
    [
        pytest.param(Stream(deltas=("a", "b")), "all", id="ends"),
        pytest.param(Stream(deltas=("a", "b"), end=http(503)), "all", id="fails"),
        pytest.param(Stream(deltas=("a", "b"), end=STOP), "all", id="ends-without-end-event"),
        pytest.param(Stream(deltas=("a", "b"), end=STALL), "all", id="stalls"),
        pytest.param(Stream(deltas=("a", "b"), end=STALL), "one-then-aclose", id="consumer-stops-early"),
        pytest.param(Stream(deltas=("a", "b"), end=STALL), "aclose-only", id="never-iterated"),
    ],
)
async def test_stream_in_flight_released_however_it_ends(step: Stream, consume: str) -> None:
    world = build_world(stream_idle_timeout_s=0.05)
    world["fake-a"].script("alpha-v1", step)
    stream = await world.executor.stream(plan(world, "alpha"), ctx(), 10, start)
    assert world.in_flight("alpha") == 1
    if consume == "all":
        with contextlib.suppress(GatewayError):
            await drain(stream)
    elif consume == "one-then-aclose":
        assert (await anext(aiter(stream))).text == "a"
        assert world.in_flight("alpha") == 1
        await stream.aclose()
    else:
        await stream.aclose()
    assert world.in_flight("alpha") == 0
    assert world["fake-a"].open_streams == 0  # the upstream was closed too
    await stream.aclose()
    assert world.in_flight("alpha") == 0  # aclose is idempotent


async def test_consumer_stopping_early_records_no_breaker_outcome() -> None:
    world = build_world(breaker=ONE_SHOT_BREAKER)
    world["fake-a"].script("alpha-v1", Stream(deltas=("a", "b"), end=STALL))
    stream = await world.executor.stream(plan(world, "alpha"), ctx(), 10, start)
    await anext(aiter(stream))
    await stream.aclose()
    assert world.states.breaker_state(A) is BreakerState.CLOSED
    assert outcomes(stream.attempts) == []


async def test_stream_tokens_count_against_deployment_tpm() -> None:
    world = build_world(aliases=[alias("pool", dep("fake-a", "alpha", tpm=100), dep("fake-b", "beta"))])
    world["fake-a"].script("alpha-v1", Stream())
    world["fake-b"].script("beta-v1", Stream())
    deployments = list(world.deployments("pool"))
    first = await world.executor.stream(deployments, ctx(), 80, start)
    await drain(first)
    second = await world.executor.stream(deployments, ctx(), 80, start)  # 160 > 100 tpm
    await drain(second)
    assert (first.deployment.key, second.deployment.key) == (A, B)
    assert outcomes(second.attempts)[0] == (A, AttemptOutcome.SKIPPED, "DEPLOYMENT_RATE_LIMITED")
