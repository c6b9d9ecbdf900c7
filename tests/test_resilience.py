"""Routing and resilience against fault-injecting emulators: retries, fallbacks, circuit breakers,
deadlines, streams that never lie, and the routing strategies.

Two OpenAI-compatible providers, `primary` and `backup`, run on two emulators; each scenario is an
alias whose deployments name emulator fault modes (see tests/emulators/openai_server.py).
`pytest -v tests/test_resilience.py -k matrix` prints the fault matrix.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .conftest import Gateway, GatewayFactory, chat, chat_stream, collect, rich_error
from .emulators.openai_server import OpenAIEmulator

FAST_RETRY = {"max_attempts": 2, "base_delay_s": 0.01, "max_delay_s": 0.05, "max_retry_after_s": 0.5}
QUIET_BREAKER = {"consecutive_failures": 1000, "min_calls": 1000}


@dataclass
class Pair:
    """Two upstreams and a factory for gateways routing between them."""

    primary: OpenAIEmulator
    backup: OpenAIEmulator
    make_gateway: GatewayFactory

    async def gateway(self, aliases: list[dict[str, Any]] | None = None, **settings: Any) -> Gateway:
        options: dict[str, Any] = {
            "providers": [
                {"name": "primary", "kind": "openai", "base_url": self.primary.base_url},
                {"name": "backup", "kind": "openai", "base_url": self.backup.base_url},
            ],
            "aliases": aliases or [],
            "retry": FAST_RETRY,
            "breaker": QUIET_BREAKER,
            "attempt_timeout_s": 0.5,
            "stream_idle_timeout_s": 0.3,
            "fallback_to_equivalents": False,
        }
        options.update(settings)
        return await self.make_gateway({}, **options)


@pytest.fixture
async def pair(make_gateway: GatewayFactory) -> AsyncIterator[Pair]:
    primary, backup = OpenAIEmulator(), OpenAIEmulator()
    await primary.start()
    await backup.start()
    yield Pair(primary, backup, make_gateway)
    await primary.stop()
    await backup.stop()


def alias(name: str, *deployments: tuple[str, str], strategy: str = "priority", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "strategy": strategy,
        "deployments": [{"provider": p, "model": m, "priority": i} for i, (p, m) in enumerate(deployments)],
        **extra,
    }


# --- fault-injection matrix ------------------------------------------------------------------

FAULTS = {
    # fault: (emulator model, code, reason) when nothing is left to try
    "500": ("status-500", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    "503": ("status-503", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    "429+retry-after": ("status-429", grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED"),
    "529": ("status-529", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    "401": ("status-401", grpc.StatusCode.INTERNAL, "PROVIDER_AUTH_FAILED"),
    "timeout": ("slow-2000", grpc.StatusCode.UNAVAILABLE, "PROVIDER_TIMEOUT"),
    "hang": ("hang", grpc.StatusCode.UNAVAILABLE, "PROVIDER_TIMEOUT"),
    "connection-drop": ("drop", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    "drop-mid-stream": ("drop-stream", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    "stall-mid-stream": ("stall-stream", grpc.StatusCode.UNAVAILABLE, "PROVIDER_TIMEOUT"),
    "malformed": ("malformed", grpc.StatusCode.UNAVAILABLE, "PROVIDER_BAD_RESPONSE"),
    "error-mid-stream": ("stream-error", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
}
MID_STREAM = {"drop-mid-stream", "stall-mid-stream", "error-mid-stream"}
DEADLINE_S = 5.0


@pytest.mark.parametrize("fallback", ["fallback", "no-fallback"])
@pytest.mark.parametrize("rpc", ["Chat", "ChatStream"])
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_matrix(pair: Pair, fault: str, rpc: str, fallback: str) -> None:
    model, code, reason = FAULTS[fault]
    deployments = [("primary", model)] + ([("backup", "default")] if fallback == "fallback" else [])
    gateway = await pair.gateway([alias("resilient", *deployments)])
    started = time.monotonic()
    answer_from = None
    error = None
    try:
        if rpc == "Chat":
            reply = await gateway.stub.Chat(chat("resilient", "ping"), timeout=DEADLINE_S)
            answer_from, text, attempts = reply.provider, reply.message.content[0].text, reply.attempts
        else:
            events = await collect(gateway.stub.ChatStream(chat_stream("resilient", "ping"), timeout=DEADLINE_S))
            final = events[-1]
            assert final.WhichOneof("event") == "final", "a successful stream ends with its final event"
            text = "".join(e.delta.text for e in events[:-1])
            answer_from, attempts = final.provider, final.final.attempts
    except grpc.aio.AioRpcError as raised:
        error = rich_error(raised)
    elapsed = time.monotonic() - started
    assert elapsed < DEADLINE_S, "every call ends within its deadline"

    if rpc == "Chat" and fault in MID_STREAM:
        # stream-only faults: a unary call gets the primary's normal answer
        assert answer_from == "primary" and text == "echo: ping"
    elif rpc == "ChatStream" and fault in MID_STREAM:
        # content reached the client: no fallback, the stream ends UNAVAILABLE, never silently
        assert error is not None and (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, reason)
        assert error.info.metadata["chunks_sent"] == "1" and error.info.metadata["provider"] == "primary"
    elif fallback == "fallback":
        assert error is None, error
        assert answer_from == "backup" and text == "echo: ping"
        assert [a.provider for a in attempts][-1] == "backup"
        assert attempts[0].provider == "primary" and attempts[0].outcome == pb.ATTEMPT_OUTCOME_ERROR
        assert attempts[-1].outcome == pb.ATTEMPT_OUTCOME_SUCCESS
    else:
        assert error is not None and (error.code, error.info.reason) == (code, reason), error
        assert error.info.metadata["provider"] == "primary"
        assert "primary/" in error.info.metadata["attempts"]
        if fault == "429+retry-after":
            assert error.retry is not None and error.retry.retry_delay.nanos == 500_000_000  # 1.5 s from upstream


# --- retries ---------------------------------------------------------------------------------


async def test_retry_then_success_on_same_deployment(pair: Pair) -> None:
    gateway = await pair.gateway([alias("a", ("primary", "flaky-503-1"))])
    reply = await gateway.stub.Chat(chat("a"))
    assert reply.provider == "primary"
    assert [(a.outcome, a.error_reason, a.upstream_status) for a in reply.attempts] == [
        (pb.ATTEMPT_OUTCOME_ERROR, "PROVIDER_UNAVAILABLE", 503),
        (pb.ATTEMPT_OUTCOME_SUCCESS, "", 0),
    ]


async def test_retry_after_is_honoured(pair: Pair) -> None:
    gateway = await pair.gateway([alias("a", ("primary", "flaky-429-1"))], retry={**FAST_RETRY, "base_delay_s": 0})
    started = time.monotonic()
    events = await collect(gateway.stub.ChatStream(chat_stream("a")))
    assert time.monotonic() - started >= 0.03  # retry-after-ms: 30
    assert [a.outcome for a in events[-1].final.attempts] == [pb.ATTEMPT_OUTCOME_ERROR, pb.ATTEMPT_OUTCOME_SUCCESS]


async def test_retry_never_waits_past_the_deadline(pair: Pair) -> None:
    retry = {"max_attempts": 5, "base_delay_s": 0, "max_delay_s": 0, "max_retry_after_s": 30}
    gateway = await pair.gateway([alias("a", ("primary", "status-429"))], retry=retry)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Chat(chat("a"), timeout=1.0)  # retry-after 1.5 s would pass the deadline
    assert time.monotonic() - started < 0.5
    assert rich_error(caught.value).info.reason == "PROVIDER_RATE_LIMITED"
    assert pair.primary.served["status-429"] == 1


@pytest.mark.parametrize("model", ["status-400", "context-length", "content-filter"])
async def test_non_retryable_errors_fail_at_once_without_fallback(pair: Pair, model: str) -> None:
    gateway = await pair.gateway([alias("a", ("primary", model), ("backup", "default"))])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Chat(chat("a"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert pair.primary.served[model] == 1 and not pair.backup.requests


async def test_hang_without_fallback_ends_at_the_client_deadline(pair: Pair) -> None:
    gateway = await pair.gateway([alias("a", ("primary", "hang"))], attempt_timeout_s=30)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Chat(chat("a"), timeout=0.4)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.0


# --- fallbacks -------------------------------------------------------------------------------


async def test_explicit_fallback_models_per_request(pair: Pair) -> None:
    gateway = await pair.gateway()
    routing = pb.RoutingOptions(fallback_models=["backup/default"])
    reply = await gateway.stub.Chat(chat("primary/status-500", routing=routing))
    assert reply.provider == "backup"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Chat(
            chat("primary/status-500", routing=pb.RoutingOptions(fallback_models=["backup/default"], fallback=False))
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_catalog_equivalents_are_default_fallbacks(pair: Pair) -> None:
    models = [
        {"id": "tier-a", "provider": "primary", "provider_model": "status-503", "equivalence_group": "tier"},
        {"id": "tier-b", "provider": "backup", "provider_model": "default", "equivalence_group": "tier"},
    ]
    gateway = await pair.gateway(models=models, fallback_to_equivalents=True)
    reply = await gateway.stub.Chat(chat("tier-a"))
    assert reply.provider == "backup" and [a.provider for a in reply.attempts] == ["primary", "primary", "backup"]
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Chat(chat("tier-a", routing=pb.RoutingOptions(fallback=False)))


# --- circuit breaker -------------------------------------------------------------------------


async def _health(gateway: Gateway, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(gateway.channel).Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


async def test_health_tells_the_truth_about_providers_and_deployments(pair: Pair) -> None:
    """Found from outside: one open breaker marked the whole provider NOT_SERVING while its other
    models answered, and `deployment/<p>/<m>` was NOT_FOUND until a breaker first moved."""
    breaker = {"consecutive_failures": 2, "min_calls": 1000, "cooldown_s": 60}
    gateway = await pair.gateway(
        [alias("a", ("primary", "status-500"), ("backup", "default")), alias("b", ("primary", "default"))],
        breaker=breaker,
        retry={"max_attempts": 1},
    )
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("deployment/primary/status-500", "deployment/primary/default", "deployment/backup/default"):
        assert await _health(gateway, name) == serving  # known from the start
    for _ in range(2):
        await gateway.stub.Chat(chat("a"))
    await asyncio.sleep(0.05)
    assert await _health(gateway, "deployment/primary/status-500") == not_serving
    assert await _health(gateway, "provider/primary") == serving  # primary/default still answers
    assert (await gateway.stub.Chat(chat("b"))).provider == "primary"
    listed = await health_pb2_grpc.HealthStub(gateway.channel).List(health_pb2.HealthListRequest())
    statuses = {name: r.status for name, r in listed.statuses.items()}
    assert statuses["deployment/primary/status-500"] == not_serving and statuses[""] == serving


async def test_breaker_opens_skips_then_admits_one_trial(pair: Pair) -> None:
    breaker = {"consecutive_failures": 3, "min_calls": 1000, "cooldown_s": 0.6}
    gateway = await pair.gateway(
        [alias("a", ("primary", "status-500"), ("backup", "default"))],
        breaker=breaker,
        retry={"max_attempts": 1},
        models=[{"id": "bad", "provider": "primary", "provider_model": "status-500"}],
    )
    for _ in range(3):
        assert (await gateway.stub.Chat(chat("a"))).provider == "backup"
    assert pair.primary.served["status-500"] == 3
    await asyncio.sleep(0.05)
    assert await _health(gateway, "deployment/primary/status-500") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await _health(gateway, "provider/primary") == health_pb2.HealthCheckResponse.NOT_SERVING
    model = (await gateway.stub.GetModel(pb.GetModelRequest(name="bad"))).model
    assert model.availability == pb.AVAILABILITY_DEGRADED

    for _ in range(5):  # open: no traffic at all
        reply = await gateway.stub.Chat(chat("a"))
        assert (
            reply.attempts[0].outcome == pb.ATTEMPT_OUTCOME_SKIPPED and reply.attempts[0].error_reason == "CIRCUIT_OPEN"
        )
    assert pair.primary.served["status-500"] == 3

    await asyncio.sleep(0.65)  # cooldown: exactly one trial call, which fails and reopens
    await gateway.stub.Chat(chat("a"))
    await gateway.stub.Chat(chat("a"))
    assert pair.primary.served["status-500"] == 4


async def test_breaker_closes_after_a_successful_trial(pair: Pair) -> None:
    breaker = {"consecutive_failures": 3, "min_calls": 1000, "cooldown_s": 0.3}
    gateway = await pair.gateway(
        [alias("a", ("primary", "flaky-500-3"), ("backup", "default"))], breaker=breaker, retry={"max_attempts": 1}
    )
    for _ in range(3):
        await gateway.stub.Chat(chat("a"))
    await asyncio.sleep(0.05)
    assert await _health(gateway, "deployment/primary/flaky-500-3") == health_pb2.HealthCheckResponse.NOT_SERVING
    await asyncio.sleep(0.3)
    reply = await gateway.stub.Chat(chat("a"))  # the trial succeeds
    assert reply.provider == "primary"
    assert (await gateway.stub.Chat(chat("a"))).provider == "primary"
    await asyncio.sleep(0.05)
    assert await _health(gateway, "deployment/primary/flaky-500-3") == health_pb2.HealthCheckResponse.SERVING


async def test_breaker_opens_on_failure_rate(pair: Pair) -> None:
    breaker = {"consecutive_failures": 1000, "failure_rate": 0.5, "min_calls": 2, "window_s": 60, "cooldown_s": 30}
    gateway = await pair.gateway(
        [alias("a", ("primary", "flaky-500-2"), ("backup", "default"))], breaker=breaker, retry={"max_attempts": 1}
    )
    for _ in range(2):  # 2 of 2 calls failed (rate 1.0 >= 0.5 with min_calls 2) → open
        await gateway.stub.Chat(chat("a"))
    reply = await gateway.stub.Chat(chat("a"))
    assert reply.provider == "backup" and reply.attempts[0].error_reason == "CIRCUIT_OPEN"


# --- strategies ------------------------------------------------------------------------------


async def test_weighted_split_within_statistical_bounds(pair: Pair) -> None:
    spec = {
        "name": "w",
        "strategy": "weighted",
        "deployments": [
            {"provider": "primary", "model": "default", "weight": 3},
            {"provider": "backup", "model": "default", "weight": 1},
        ],
    }
    gateway = await pair.gateway([spec])
    counts = collections.Counter([(await gateway.stub.Chat(chat("w"))).provider for _ in range(400)])
    # binomial(400, 0.75): mean 300, sd 8.7; ±45 is more than 5 sd
    assert 255 <= counts["primary"] <= 345, counts


async def test_least_latency_moves_traffic_away_from_a_slowed_deployment(pair: Pair) -> None:
    gateway = await pair.gateway([alias("l", ("primary", "default"), ("backup", "default"), strategy="least_latency")])
    for _ in range(6):
        await gateway.stub.Chat(chat("l"))
    pair.primary.delay_s = 0.3
    chosen = [(await gateway.stub.Chat(chat("l"))).provider for _ in range(20)]
    # One call to the slowed primary moves the traffic; one backup call stalled on a busy machine
    # (parallel tests) may send it one more call, after which its moving average keeps it away.
    assert chosen[-15:].count("backup") >= 14, chosen
    streamed = [(await collect(gateway.stub.ChatStream(chat_stream("l"))))[-1].provider for _ in range(5)]
    assert streamed[-3:] == ["backup"] * 3


async def test_lowest_cost_picks_the_cheapest_healthy_deployment(pair: Pair, make_gateway: GatewayFactory) -> None:
    price = lambda usd: {"input_per_million_usd": usd, "output_per_million_usd": usd}  # noqa: E731
    models = [
        {"id": "cheapest", "provider": "primary", "provider_model": "status-500", "pricing": price(0.1)},
        {"id": "middle", "provider": "backup", "provider_model": "default", "pricing": price(1.0)},
        {"id": "dearest", "provider": "primary", "provider_model": "default", "pricing": price(9.0)},
    ]
    spec = {
        "name": "c",
        "strategy": "lowest_cost",
        "deployments": [
            {"provider": "primary", "model": "dearest"},
            {"provider": "backup", "model": "middle"},
            {"provider": "primary", "model": "cheapest"},
        ],
    }
    gateway = await pair.gateway(
        [spec],
        models=models,
        retry={"max_attempts": 1},
        breaker={"consecutive_failures": 1, "min_calls": 1000, "cooldown_s": 30},
    )
    replies = [await gateway.stub.Chat(chat("c")) for _ in range(5)]
    assert [r.model for r in replies] == ["default"] * 5 and {r.provider for r in replies} == {"backup"}
    assert replies[0].attempts[0].model == "status-500"  # tried first, failed, breaker opened
    assert all(r.attempts[0].outcome == pb.ATTEMPT_OUTCOME_SKIPPED for r in replies[1:])
    assert pair.primary.served.get("default", 0) == 0  # the dearest was never needed


async def test_least_busy_avoids_a_deployment_with_calls_in_flight(pair: Pair) -> None:
    gateway = await pair.gateway([alias("b", ("primary", "default"), ("backup", "default"), strategy="least_busy")])
    pair.primary.delay_s = 0.4
    slow = asyncio.ensure_future(gateway.stub.Chat(chat("b")))  # occupies primary (first in order)
    await asyncio.sleep(0.1)
    assert (await gateway.stub.Chat(chat("b"))).provider == "backup"
    assert (await slow).provider == "primary"


async def test_strategy_override_per_request(pair: Pair) -> None:
    gateway = await pair.gateway([alias("o", ("primary", "slow-100"), ("backup", "default"))])
    for _ in range(3):
        await gateway.stub.Chat(chat("o"))  # priority: primary each time
    reply = await gateway.stub.Chat(chat("o", routing=pb.RoutingOptions(strategy=pb.ROUTING_STRATEGY_LEAST_LATENCY)))
    assert reply.provider == "backup"  # never measured: tried first


async def test_deployment_rpm_limit_spills_to_the_next_deployment(pair: Pair) -> None:
    spec = {
        "name": "r",
        "deployments": [
            {"provider": "primary", "model": "default", "rpm": 2},
            {"provider": "backup", "model": "default", "priority": 1},
        ],
    }
    gateway = await pair.gateway([spec])
    providers = [(await gateway.stub.Chat(chat("r"))).provider for _ in range(4)]
    assert providers == ["primary", "primary", "backup", "backup"]


async def test_deployment_tpm_limit_counts_the_reserved_estimate(pair: Pair) -> None:
    spec = {
        "name": "t",
        "deployments": [
            {"provider": "primary", "model": "default", "tpm": 100},
            {"provider": "backup", "model": "default", "priority": 1},
        ],
    }
    gateway = await pair.gateway([spec])
    generation = pb.GenerationOptions(max_output_tokens=60)  # ~5 input tokens + 60 output reserved per call
    providers = [(await gateway.stub.Chat(chat("t", generation=generation))).provider for _ in range(3)]
    assert providers == ["primary", "backup", "backup"]
    skipped = (await gateway.stub.Chat(chat("t", generation=generation))).attempts[0]
    assert (skipped.outcome, skipped.error_reason) == (pb.ATTEMPT_OUTCOME_SKIPPED, "DEPLOYMENT_RATE_LIMITED")
