"""Quotas (rate limits, stream slots and budgets of a key and its team) in one backend call before a
call and one after: the backends driven directly (in memory and on a real `redis-server`), and the
interceptor through a real grpc.aio server with the real servicer, router and OpenAI emulator.

In the server tests the auth layer is replaced by `TenantLayer`, which puts a `Tenant` on the call
record from the `x-api-key` metadata the way the key cache does, so these tests do not depend on
how keys are stored.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import redis
import structlog
from google.rpc import error_details_pb2, status_pb2
from redis.asyncio.connection import Connection as RedisConnection
from redis.crc import key_slot

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc
from llm_gateway_server.app import build_application
from llm_gateway_server.config import load_settings
from llm_gateway_server.interceptors.base import AdmissionInterceptor, InterceptorChain
from llm_gateway_server.interceptors.cache import CacheInterceptor
from llm_gateway_server.interceptors.quota import QuotaInterceptor, request_token_estimate, settled_usage
from llm_gateway_server.interceptors.validation import ValidationInterceptor
from llm_gateway_server.routing.pricing import CostEstimator
from llm_gateway_server.routing.resolver import Resolver
from llm_gateway_server.state.base import (
    BUDGET_MARGIN_S,
    WINDOW_S,
    BackendUnavailableError,
    BudgetQuota,
    QuotaBackend,
    QuotaRequest,
    ScopeQuota,
)
from llm_gateway_server.state.memory import MemoryQuotas
from llm_gateway_server.state.redis_backend import RedisQuotas
from llm_gateway_server.telemetry.metrics import Metrics
from llm_gateway_server.tenancy.records import (
    Budget,
    BudgetPeriod,
    KeyRecord,
    Limits,
    SpendSeed,
    TeamRecord,
    Tenant,
    period_bounds,
    usd_to_nano,
)
from llm_gateway_server.transport.call_record import CallRecord, current_call
from llm_gateway_server.transport.server import GrpcServer, start_grpc

from .conftest import RedisServer, chat, chat_stream, collect, expect_error
from .emulators.openai_server import OpenAIEmulator

# The clock of most tests: a minute before the coming UTC midnight (the day that ends then is
# today's: Redis expiries set from it lie in the future).
_TODAY = period_bounds(BudgetPeriod.DAILY, datetime.now(UTC))
assert _TODAY[0] is not None and _TODAY[1] is not None
DAY_START, DAY_END = int(_TODAY[0].timestamp()), int(_TODAY[1].timestamp())
T0 = DAY_END - 60.0
# Priced models of the server tests, at 1 / 2 USD per million tokens (1000 / 2000 nano-USD per
# token). The emulator answers 11 input and 7 output tokens: 25,000 nano-USD a call.
PRICED = "priced-model"
CALL_COST = 11 * 1000 + 7 * 2000
_PRICES = {"input_per_million_usd": 1.0, "output_per_million_usd": 2.0}
MODELS = [
    {"id": PRICED, "provider": "openai", "capabilities": ["chat", "streaming", "embeddings"], "pricing": _PRICES},
    {"id": "stream-error", "provider": "openai", "pricing": _PRICES},
]
# 40 characters: the input estimate (10 + 4 framing) is not below the emulator's 11 tokens, and
# with max_output_tokens 7 the estimate (14 + 7 tokens: 28,000 nano-USD) bounds the real cost.
TEXT = "x" * 40
ESTIMATE = 14 * 1000 + 7 * 2000
BOUNDED = pb.GenerationOptions(max_output_tokens=7)


# --- helpers ---------------------------------------------------------------------------------


def daily(limit_nano: int, seed: int = 0) -> BudgetQuota:
    return BudgetQuota(limit_nano, BudgetPeriod.DAILY, DAY_START, DAY_END, seed)


def ask(scopes: tuple[ScopeQuota, ...], cost: int = 0, tokens: int = 0, now: float = T0, **kw: Any) -> QuotaRequest:
    return QuotaRequest("teams/t", scopes, tokens, cost, now, **kw)


@pytest.fixture(params=["memory", "redis"])
def backends(request: pytest.FixtureRequest) -> Callable[[], QuotaBackend]:
    """A factory of backends sharing one state: the same in-memory instance, or a new Redis
    client (its own connection pool, as another process would have) on one real Redis."""
    if request.param == "memory":
        shared = MemoryQuotas()
        return lambda: shared
    server: RedisServer = request.getfixturevalue("redis_server")
    return lambda: RedisQuotas(server.url, 2.0)


def spend_of(server: RedisServer, scope: str, budget: BudgetQuota, tag: str = "teams/t") -> int:
    client = redis.Redis(port=server.port)
    try:
        return int(client.get(f"llmgw:{{{tag}}}:{scope}:{budget.counter}") or 0)
    finally:
        client.close()


def evalsha_calls(client: redis.Redis) -> int:
    """EVALSHA calls the server has answered (INFO commandstats; commands a script runs count under
    their own names, so only top-level calls count here)."""
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


class CountingConnection(RedisConnection):
    """A real redis-py connection that counts what it sends: one packed send is one request on
    the wire (a round trip: the client waits for its reply before it goes on)."""

    sent: list[list[bytes]]

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        parts = [command] if isinstance(command, (bytes, str, memoryview)) else list(command)
        self.sent.append([bytes(p) if not isinstance(p, str) else p.encode() for p in parts])
        await super().send_packed_command(command, check_health)


def count_round_trips(backend: RedisQuotas) -> list[list[bytes]]:
    """Makes `backend`'s connections `CountingConnection`s; returns the list they append to."""
    sent: list[list[bytes]] = []
    pool = backend._client.redis.connection_pool
    pool.connection_class = type("Counting", (CountingConnection,), {"sent": sent})
    return sent


def commands(sent: list[list[bytes]]) -> list[str]:
    """The command name of every request sent (the first word after the RESP header)."""
    return [b"".join(parts).split(b"\r\n")[2].decode().upper() for parts in sent]


# --- the backends, driven directly -----------------------------------------------------------


async def test_a_budget_admits_while_spend_is_below_the_limit(backends: Callable[[], QuotaBackend]) -> None:
    backend = backends()
    budget = daily(100)
    scopes = (ScopeQuota("keys/k", budget=budget),)
    spent = []
    for _ in range(3):
        admission = await backend.admit(ask(scopes, cost=40))
        assert admission.allowed
        spent.append(admission.counts[0].spend_nano_usd)
        await backend.settle(admission, 0, 30)  # cheaper than estimated: the rest is given back
    assert spent == [40, 70, 100]
    last = await backend.admit(ask(scopes, cost=1))  # spend is 3 × 30: at 90 < 100 one more is admitted
    assert last.allowed and last.counts[0].spend_nano_usd == 91
    await backend.settle(last, 0, 30)
    refused = await backend.admit(ask(scopes, cost=1))
    assert (refused.allowed, refused.exceeded, refused.refused) == (False, "budget", 0)
    assert refused.counts[0].spend_nano_usd == 120
    await backend.aclose()


async def test_a_call_is_refused_once_spend_reaches_the_limit(backends: Callable[[], QuotaBackend]) -> None:
    backend = backends()
    scopes = (ScopeQuota("keys/k", budget=daily(100)),)
    admission = await backend.admit(ask(scopes, cost=100))
    assert admission.allowed
    await backend.settle(admission, 0, 100)
    refused = await backend.admit(ask(scopes, cost=0))  # even a free call: the budget is spent
    assert not refused.allowed and refused.counts[0].spend_nano_usd == 100
    await backend.aclose()


async def test_concurrent_admits_from_two_instances_never_pass_the_budget_by_more_than_one_call(
    redis_server: RedisServer,
) -> None:
    """Two clients (two connection pools, as two gateway processes) on one Redis, 200 concurrent
    admits: exactly ceil(B / estimate) are admitted, so the reserved total is below B + one
    estimate."""
    first, second = RedisQuotas(redis_server.url, 2.0), RedisQuotas(redis_server.url, 2.0)
    budget, estimate = daily(1_000_000), 30_001
    scopes = (ScopeQuota("keys/k", budget=budget),)
    results = await asyncio.gather(
        *((first if i % 2 else second).admit(ask(scopes, cost=estimate)) for i in range(200))
    )
    admitted = [r for r in results if r.allowed]
    assert len(admitted) == -(-1_000_000 // estimate) == 34
    assert len(admitted) * estimate < 1_000_000 + estimate
    assert {r.exceeded for r in results if not r.allowed} == {"budget"}
    assert spend_of(redis_server, "keys/k", budget) == 34 * estimate
    await first.aclose()
    await second.aclose()


async def test_admits_and_settles_interleaved_across_two_instances_stay_within_the_bound(
    redis_server: RedisServer,
) -> None:
    """Calls admitted, run (random durations) and settled with a real cost at most their estimate,
    from two clients at once: the real total of the admitted calls stays below B + the largest
    estimate, and every refusal is the budget's."""
    clients = [RedisQuotas(redis_server.url, 5.0), RedisQuotas(redis_server.url, 5.0)]
    budget = daily(5_000_000)
    scopes = (ScopeQuota("keys/k", budget=budget), ScopeQuota("teams/t", rpm=10**6))
    rng = random.Random(12)
    spent: list[int] = []
    refusals: list[str] = []

    async def call(i: int) -> None:
        estimate = rng.randint(1_000, 200_000)
        real = rng.randint(0, estimate)
        backend = clients[i % 2]
        admission = await backend.admit(ask(scopes, cost=estimate, tokens=10))
        if not admission.allowed:
            refusals.append(admission.exceeded)
            return
        await asyncio.sleep(rng.random() / 50)
        await backend.settle(admission, 5, real)
        spent.append(real)

    await asyncio.gather(*(call(i) for i in range(300)))
    assert refusals and set(refusals) == {"budget"}
    assert sum(spent) < 5_000_000 + 200_000
    assert spend_of(redis_server, "keys/k", budget) == sum(spent)
    for client in clients:
        await client.aclose()


async def test_key_and_team_are_checked_and_reserved_together(backends: Callable[[], QuotaBackend]) -> None:
    backend = backends()
    team = ScopeQuota("teams/t", rpm=3, budget=daily(1_000))

    def of(key: str) -> tuple[ScopeQuota, ...]:
        return (ScopeQuota(f"keys/{key}", rpm=2, tpm=100), team)

    one = await backend.admit(ask(of("a"), cost=10, tokens=40))
    two = await backend.admit(ask(of("b"), cost=10, tokens=40))
    assert one.allowed and two.allowed
    assert two.counts[1].requests == 2 and two.counts[1].spend_nano_usd == 20  # the team counts both keys
    assert two.counts[0].requests == 1 and two.counts[0].tokens == 40  # each key only its own
    three = await backend.admit(ask(of("a"), cost=10, tokens=70))  # over key a's tokens
    assert (three.allowed, three.refused, three.exceeded) == (False, 0, "tokens")
    four = await backend.admit(ask(of("b"), cost=10, tokens=1))
    assert four.allowed and four.counts[1].requests == 3
    five = await backend.admit(ask(of("c"), cost=10, tokens=1))  # over the team's requests
    assert (five.allowed, five.refused, five.exceeded) == (False, 1, "requests")
    # nothing of a refused call was reserved, in either scope
    again = await backend.admit(ask((ScopeQuota("keys/c", rpm=2), ScopeQuota("teams/t", budget=daily(1_000)))))
    assert again.counts[0].requests == 1 and again.counts[1].spend_nano_usd == 30
    await backend.aclose()


async def test_budget_refused_before_rate_limits_and_by_the_first_scope_that_fails(
    backends: Callable[[], QuotaBackend],
) -> None:
    backend = backends()
    scopes = (ScopeQuota("keys/k", rpm=1, budget=daily(10, seed=10)), ScopeQuota("teams/t", budget=daily(5, seed=9)))
    refused = await backend.admit(ask(scopes, cost=1))
    assert (refused.refused, refused.exceeded, refused.counts[0].spend_nano_usd) == (0, "budget", 10)
    await backend.aclose()


async def test_a_counter_starts_from_its_seed_only_when_it_does_not_exist(
    backends: Callable[[], QuotaBackend],
) -> None:
    backend = backends()
    first = await backend.admit(ask((ScopeQuota("keys/k", budget=daily(1_000, seed=600)),), cost=100))
    assert first.counts[0].spend_nano_usd == 700
    later = await backend.admit(ask((ScopeQuota("keys/k", budget=daily(1_000, seed=0)),), cost=100))
    assert later.counts[0].spend_nano_usd == 800  # the counter exists: a later seed is not used
    await backend.aclose()


async def test_periods_roll_over(backends: Callable[[], QuotaBackend]) -> None:
    backend = backends()
    today = (ScopeQuota("keys/k", budget=daily(100)),)
    admission = await backend.admit(ask(today, cost=100))
    await backend.settle(admission, 0, 100)
    assert not (await backend.admit(ask(today, cost=1, now=T0 + 30))).allowed
    tomorrow = BudgetQuota(100, BudgetPeriod.DAILY, DAY_END, DAY_END + 86_400, 0)
    next_day = await backend.admit(ask((ScopeQuota("keys/k", budget=tomorrow),), cost=1, now=T0 + 61))
    assert next_day.allowed and next_day.counts[0].spend_nano_usd == 1
    # a call admitted yesterday and settled today settles into yesterday's counter
    await backend.settle(admission, 0, 50)
    again = await backend.admit(ask((ScopeQuota("keys/k", budget=tomorrow),), cost=0, now=T0 + 62))
    assert again.counts[0].spend_nano_usd == 1
    await backend.aclose()


async def test_redis_losing_its_counters_rebuilds_them_from_the_seed(redis_server: RedisServer) -> None:
    backend = RedisQuotas(redis_server.url, 2.0)
    scopes = (ScopeQuota("keys/k", budget=daily(1_000, seed=400)),)
    assert (await backend.admit(ask(scopes, cost=100))).counts[0].spend_nano_usd == 500
    redis.Redis(port=redis_server.port).flushall()
    assert (await backend.admit(ask(scopes, cost=100))).counts[0].spend_nano_usd == 500
    await backend.aclose()


async def test_counters_expire_after_their_period_and_lifetime_ones_never(redis_server: RedisServer) -> None:
    backend = RedisQuotas(redis_server.url, 2.0)
    lifetime = BudgetQuota(1_000, BudgetPeriod.TOTAL, None, None, 0)
    scopes = (ScopeQuota("keys/k", rpm=5, budget=daily(1_000)), ScopeQuota("teams/t", budget=lifetime))
    await backend.admit(ask(scopes, cost=1, now=time.time()))
    client = redis.Redis(port=redis_server.port)
    day = client.execute_command("PEXPIRETIME", "llmgw:{teams/t}:keys/k:" + daily(1).counter)
    assert day == (DAY_END + BUDGET_MARGIN_S) * 1000
    assert client.pttl("llmgw:{teams/t}:teams/t:spend:total") == -1
    window = int(time.time() // WINDOW_S)
    assert 0 < client.pttl(f"llmgw:{{teams/t}}:keys/k:win:{window}") <= 2 * WINDOW_S * 1000
    client.close()
    await backend.aclose()


async def test_memory_counters_of_past_periods_and_windows_are_swept() -> None:
    backend = MemoryQuotas()
    await backend.admit(ask((ScopeQuota("peer:10.0.0.1", rpm=5, budget=daily(10)),), now=T0))
    later = DAY_END + BUDGET_MARGIN_S + 1
    await backend.admit(ask((ScopeQuota("peer:10.0.0.2", rpm=5),), now=later))
    assert list(backend._windows) == ["peer:10.0.0.2"] and not backend._spend


async def test_every_key_of_a_call_is_in_one_cluster_slot(redis_server: RedisServer) -> None:
    backend = RedisQuotas(redis_server.url, 2.0)
    scopes = (
        ScopeQuota("keys/k", rpm=5, max_streams=2, budget=daily(10)),
        ScopeQuota("teams/t", tpm=500, max_streams=3, budget=daily(10)),
    )
    await backend.admit(ask(scopes, cost=1, tokens=1, stream_id="s1", stream_max_age_s=60))
    client = redis.Redis(port=redis_server.port)
    names = client.keys("llmgw:*")
    assert len(names) == 6 and len({key_slot(bytes(n)) for n in names}) == 1
    client.close()
    await backend.aclose()


async def test_one_script_call_before_and_one_after(redis_server: RedisServer) -> None:
    backend = RedisQuotas(redis_server.url, 2.0)
    sent = count_round_trips(backend)
    client = redis.Redis(port=redis_server.port)
    scopes = (
        ScopeQuota("keys/k", rpm=50, tpm=5_000, max_streams=2, budget=daily(10_000)),
        ScopeQuota("teams/t", rpm=100, tpm=9_000, max_streams=5, budget=daily(50_000)),
    )
    request = ask(scopes, cost=10, tokens=100, stream_id="s", stream_max_age_s=60)
    admission = await backend.admit(request)  # the first call of each script loads it (NOSCRIPT)
    await backend.settle(admission, 80, 7)
    setup = [c for c in commands(sent) if c not in ("HELLO", "CLIENT")]  # the connection's handshake
    assert setup == ["EVALSHA", "SCRIPT", "EVALSHA"] * 2
    sent.clear()
    admission = await backend.admit(request)
    assert commands(sent) == ["EVALSHA"]
    sent.clear()
    await backend.settle(admission, 80, 7)
    assert commands(sent) == ["EVALSHA"]
    client.script_flush()  # Redis restarted without its scripts: loaded again, the call passes
    assert (await backend.admit(request)).allowed
    sent.clear()
    before = evalsha_calls(client)
    assert (await backend.admit(request)).allowed
    assert commands(sent) == ["EVALSHA"] and evalsha_calls(client) - before == 1
    client.close()
    await backend.aclose()


async def test_stream_slots(backends: Callable[[], QuotaBackend]) -> None:
    backend = backends()
    scopes = (ScopeQuota("keys/k", max_streams=1), ScopeQuota("teams/t", max_streams=2))

    def stream(sid: str, now: float = T0) -> QuotaRequest:
        return ask(scopes, stream_id=sid, stream_max_age_s=30, now=now)

    held = await backend.admit(stream("a"))
    assert held.allowed
    refused = await backend.admit(stream("b"))
    assert (refused.allowed, refused.refused, refused.exceeded) == (False, 0, "streams")
    unary = await backend.admit(ask(scopes))  # a unary call takes no slot
    assert unary.allowed
    await backend.settle(held, 0, 0)
    again = await backend.admit(stream("c"))
    assert again.allowed
    # a slot whose holder never settled (a crashed process) is dropped after the maximum age
    assert (await backend.admit(stream("d", now=T0 + 31))).allowed
    await backend.aclose()


async def test_redis_down_fails_fast(redis_server: RedisServer) -> None:
    backend = RedisQuotas(redis_server.url, 0.25)
    scopes = (ScopeQuota("keys/k", rpm=5, budget=daily(10)),)
    admission = await backend.admit(ask(scopes, now=time.time()))
    redis_server.kill()
    for call in (backend.admit(ask(scopes, now=time.time())), backend.settle(admission, 1, 1)):
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            await call
        assert time.monotonic() - started < 1.0
    await backend.aclose()


# --- cost estimates ------------------------------------------------------------------------


def _resolver(**overrides: Any) -> Resolver:
    settings = load_settings(environ={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, overrides=overrides)
    application = build_application(settings, {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    return Resolver(application.catalog, application.registry, settings.aliases)


def test_cost_estimates_at_catalog_prices() -> None:
    cheap = {"id": "cheap", "provider": "openai", "pricing": {"input_per_million_usd": 1, "output_per_million_usd": 1}}
    dear = {"id": "dear", "provider": "openai", "pricing": {"input_per_million_usd": 3, "output_per_million_usd": 9}}
    estimate = CostEstimator(
        _resolver(
            models=[cheap, dear, {"id": "free-form", "provider": "openai"}],
            aliases=[
                {
                    "name": "both",
                    "deployments": [{"provider": "openai", "model": "cheap"}, {"provider": "openai", "model": "dear"}],
                },
                {
                    "name": "half",
                    "deployments": [
                        {"provider": "openai", "model": "cheap"},
                        {"provider": "openai", "model": "free-form"},
                    ],
                },
            ],
        )
    )
    assert estimate("cheap", 1_000, 500) == 1_500_000  # 1,500 tokens at 1 USD per million: 1.5 mUSD
    assert estimate("dear", 1_000, 500) == 3_000_000 + 4_500_000
    assert estimate("both", 1_000, 500) == 7_500_000  # an alias: its most expensive deployment
    assert estimate("half", 1_000, 500) == 1_500_000  # the priced deployment of a partly priced alias
    assert estimate("free-form", 10, 10) is None  # in the catalog without prices
    assert estimate("some-passthrough-model", 10, 10) is None  # the passthrough provider, unpriced
    assert estimate("gpt-4o-mini", 1_000_000, 0) == usd_to_nano(0.15)  # built-in catalog price
    assert estimate("llama3.2", 100, 100) == 0  # its provider (Ollama) is not configured: refused, costs 0
    assert estimate("ollama/llama3.2", 100, 100) is None  # the passthrough provider takes the name, unpriced
    assert estimate("cheap", -5, -5) == 0


def test_the_token_estimate_splits_input_and_output() -> None:
    request = chat("m", "x" * 40, generation=pb.GenerationOptions(max_output_tokens=7))
    assert request_token_estimate(request, 1024) == (14, 7)
    assert request_token_estimate(chat("m", "x" * 40), 1024) == (14, 1024)
    assert request_token_estimate(pb.EmbedRequest(model="e", inputs=["abcd", "abcdefgh"]), 1024) == (3, 0)
    assert request_token_estimate(pb.ListModelsRequest(), 1024) == (0, 0)


# --- the interceptor through a real server ---------------------------------------------------


class TenantLayer(AdmissionInterceptor):
    """Stands in for auth and the key cache: `x-api-key: <id>` → the tenant registered for it (no
    header: an anonymous call). Keeps every call record, so a test can read the outcome."""

    def __init__(self, tenants: dict[str, Tenant]) -> None:
        self.tenants = tenants
        self.records: list[CallRecord] = []

    def admit(self, context: grpc.aio.ServicerContext[Any, Any], request: Any) -> None:
        record = current_call.get()
        assert record is not None
        self.records.append(record)
        name = dict(context.invocation_metadata() or ()).get("x-api-key")
        if isinstance(name, str):
            record.tenant = self.tenants[name]
            record.key_id = record.tenant.key.id


@dataclass
class QuotaGateway:
    server: GrpcServer
    channel: grpc.aio.Channel
    stub: pb_grpc.LLMGatewayServiceStub
    quota: QuotaInterceptor
    tenants: TenantLayer
    metrics: Metrics
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


GatewayMaker = Callable[..., Awaitable[QuotaGateway]]


@pytest.fixture
async def quota_gateway(openai_upstream: OpenAIEmulator) -> AsyncIterator[GatewayMaker]:
    """Factory: a gateway (real servicer, router, OpenAI emulator upstream) whose chain is
    observability → `TenantLayer` → validation → `QuotaInterceptor(backend)`."""
    made: list[QuotaGateway] = []

    async def make(
        backend: QuotaBackend,
        tenants: dict[str, Tenant] | None = None,
        clock: Callable[[], float] = time.time,
        **overrides: Any,
    ) -> QuotaGateway:
        environ = {"OPENAI_BASE_URL": openai_upstream.base_url}
        settings = load_settings(
            environ=environ,
            overrides={"port": 0, "retry": {"max_attempts": 1}, "metrics_port": 0, "models": MODELS, **overrides},
        )
        application = build_application(settings, environ)
        chain = application.interceptors[0]
        assert isinstance(chain, InterceptorChain)
        metrics = Metrics()
        estimate = CostEstimator(Resolver(application.catalog, application.registry, settings.aliases))
        quota = QuotaInterceptor(backend, settings.rate_limits, settings.budgets, estimate, metrics, 30.0, clock)
        layer = TenantLayer(tenants or {})
        cache = [c for c in chain.layers if isinstance(c, CacheInterceptor)]
        interceptors = InterceptorChain([chain.layers[0], layer, ValidationInterceptor(), quota, *cache])
        server = await start_grpc(
            application.servicer,
            [interceptors],
            host="127.0.0.1",
            port=0,
            max_message_bytes=settings.max_message_bytes,
            reuse_port=False,
            grace_period_s=0.5,
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        gateway = QuotaGateway(server, channel, pb_grpc.LLMGatewayServiceStub(channel), quota, layer, metrics)
        gateway.closers += [channel.close, server.stop, quota.aclose, application.aclose, backend.aclose]
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        for close in gateway.closers:
            await close()


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Callable[[], QuotaBackend]:
    """A backend factory (one shared in-memory instance, or new clients of one real Redis)."""
    if request.param == "memory":
        shared = MemoryQuotas()
        return lambda: shared
    server: RedisServer = request.getfixturevalue("redis_server")
    return lambda: RedisQuotas(server.url, 0.25)


NO_LIMITS = Limits()


def tenant(
    key_id: str,
    limits: Limits = NO_LIMITS,
    budget: Budget | None = None,
    team: TeamRecord | None = None,
    key_spend: SpendSeed | None = None,
    team_spend: SpendSeed | None = None,
) -> Tenant:
    key = KeyRecord(key_id, key_id, "0" * 64, team_id=team.id if team else "", limits=limits, budget=budget)
    return Tenant(key, team, key_spend, team_spend)


def usd(value: float, period: BudgetPeriod = BudgetPeriod.DAILY) -> Budget:
    return Budget(usd_to_nano(value), period)


def as_key(name: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", name),)


def quota_failure(error: grpc.aio.AioRpcError) -> error_details_pb2.QuotaFailure:
    raw = next(v for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin")
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            return failure
    raise AssertionError("no QuotaFailure")


async def budget_refusal(call: Awaitable[Any]) -> tuple[grpc.aio.AioRpcError, Any]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value, await expect_error(_raise(caught.value))


async def _raise(error: grpc.aio.AioRpcError) -> None:
    raise error


async def test_a_key_budget_is_enforced_with_quota_failure_and_retry_info(
    quota_gateway: GatewayMaker, backend: Callable[[], QuotaBackend]
) -> None:
    tenants = {"k1": tenant("k1", budget=Budget(3 * CALL_COST, BudgetPeriod.DAILY))}
    gateway = await quota_gateway(backend(), tenants, clock=lambda: T0)
    remaining = []
    for _ in range(3):
        call = gateway.stub.Chat(chat(PRICED, TEXT, generation=BOUNDED), metadata=as_key("k1"))
        await call
        remaining.append(dict(await call.trailing_metadata())["x-budget-remaining-usd"])
    # after each call's reservation (28,000 nano-USD) on top of the calls settled before it
    assert remaining == [f"{max(3 * CALL_COST - ESTIMATE - n * CALL_COST, 0) / 1e9:.9f}" for n in range(3)]
    raw, error = await budget_refusal(gateway.stub.Chat(chat(PRICED, TEXT, generation=BOUNDED), metadata=as_key("k1")))
    assert (error.code, error.info.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "BUDGET_EXCEEDED")
    assert error.info.metadata["subject"] == "keys/k1" and error.info.metadata["period"] == "daily"
    assert float(error.info.metadata["spend_usd"]) == pytest.approx(3 * CALL_COST / 1e9)
    assert error.retry is not None and error.retry.retry_delay.seconds == 60  # until midnight UTC
    violation = quota_failure(raw).violations[0]
    assert violation.subject == "keys/k1" and "daily" in violation.description
    assert gateway.value("llm_gateway_rate_limit_rejections_total", limit="budget") == 1


async def test_a_lifetime_budget_has_no_retry_info(quota_gateway: GatewayMaker) -> None:
    tenants = {"k1": tenant("k1", budget=Budget(1, BudgetPeriod.TOTAL))}
    gateway = await quota_gateway(MemoryQuotas(), tenants)
    await gateway.stub.Chat(chat(PRICED, TEXT), metadata=as_key("k1"))
    error = await expect_error(gateway.stub.Chat(chat(PRICED, TEXT), metadata=as_key("k1")))
    assert error.info.reason == "BUDGET_EXCEEDED" and error.info.metadata["period"] == "total"
    assert error.retry is None and "lifetime" in error.message


async def test_a_team_budget_counts_every_key_of_the_team(
    quota_gateway: GatewayMaker, backend: Callable[[], QuotaBackend]
) -> None:
    team = TeamRecord("t1", "team one", budget=Budget(2 * CALL_COST, BudgetPeriod.MONTHLY))
    tenants = {"a": tenant("a", team=team), "b": tenant("b", team=team, budget=usd(10))}
    gateway = await quota_gateway(backend(), tenants)
    await gateway.stub.Chat(chat(PRICED, TEXT, generation=BOUNDED), metadata=as_key("a"))
    await gateway.stub.Chat(chat(PRICED, TEXT, generation=BOUNDED), metadata=as_key("b"))
    raw, error = await budget_refusal(gateway.stub.Chat(chat(PRICED, TEXT), metadata=as_key("a")))
    assert error.info.metadata["subject"] == "teams/t1" and error.info.metadata["period"] == "monthly"
    assert quota_failure(raw).violations[0].subject == "teams/t1"


async def test_a_seed_counts_only_for_its_own_period(quota_gateway: GatewayMaker) -> None:
    today = datetime.fromtimestamp(DAY_START, UTC)
    spent = SpendSeed(today, 10 * CALL_COST)
    stale = SpendSeed(today - timedelta(days=1), 10 * CALL_COST)
    tenants = {
        "spent": tenant("spent", budget=Budget(10 * CALL_COST, BudgetPeriod.DAILY), key_spend=spent),
        "stale": tenant("stale", budget=Budget(10 * CALL_COST, BudgetPeriod.DAILY), key_spend=stale),
    }
    clock = [T0]
    gateway = await quota_gateway(MemoryQuotas(), tenants, clock=lambda: clock[0])
    error = await expect_error(gateway.stub.Chat(chat(PRICED, TEXT), metadata=as_key("spent")))
    assert error.info.reason == "BUDGET_EXCEEDED"  # the ledger's spend of today, after a restart
    await gateway.stub.Chat(chat(PRICED, TEXT), metadata=as_key("stale"))  # yesterday's spend: not today's
    clock[0] = T0 + 120  # the next day: the seed (of yesterday now) no longer counts
    await gateway.stub.Chat(chat(PRICED, TEXT), metadata=as_key("spent"))


async def test_the_real_cost_replaces_the_estimate(quota_gateway: GatewayMaker, redis_server: RedisServer) -> None:
    budget = Budget(usd_to_nano(1.0), BudgetPeriod.DAILY)
    gateway = await quota_gateway(
        RedisQuotas(redis_server.url, 0.25),
        {"k": tenant("k", budget=budget)},
        clock=lambda: T0,
        cache={"enabled": True},
    )
    quota = daily(1)

    async def spend_after(call: Awaitable[Any]) -> int:
        await call
        await asyncio.sleep(0.05)
        return spend_of(redis_server, "keys/k", quota, tag="keys/k")

    assert await spend_after(gateway.stub.Chat(chat(PRICED, TEXT), metadata=as_key("k"))) == CALL_COST
    assert (
        await spend_after(collect(gateway.stub.ChatStream(chat_stream(PRICED, TEXT), metadata=as_key("k"))))
        == 2 * CALL_COST
    )
    embed = pb.EmbedRequest(model=PRICED, inputs=["a", "b"])
    assert await spend_after(gateway.stub.Embed(embed, metadata=as_key("k"))) == 2 * CALL_COST + 6 * 1000
    hit = await spend_after(gateway.stub.Chat(chat(PRICED, TEXT), metadata=as_key("k")))
    assert hit == 2 * CALL_COST + 6_000 and gateway.tenants.records[-1].outcome.cache_hit  # a cache hit costs 0
    # a stream that fails after content: charged what its outcome says it used, its estimate given back
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(gateway.stub.ChatStream(chat_stream("stream-error", TEXT), metadata=as_key("k")))
    await asyncio.sleep(0.05)
    _, partial = settled_usage(gateway.tenants.records[-1].outcome)
    assert spend_of(redis_server, "keys/k", quota, tag="keys/k") == 2 * CALL_COST + 6_000 + partial


@pytest.mark.parametrize("policy", ["allow", "refuse"])
async def test_unpriced_models_under_a_budget(quota_gateway: GatewayMaker, policy: str) -> None:
    backend = MemoryQuotas()
    tenants = {"k": tenant("k", budget=usd(1)), "free": tenant("free")}
    gateway = await quota_gateway(backend, tenants, budgets={"unpriced_models": policy})
    with structlog.testing.capture_logs() as logs:
        if policy == "allow":
            for _ in range(2):
                await gateway.stub.Chat(chat("unpriced-model"), metadata=as_key("k"))
        else:
            error = await expect_error(gateway.stub.Chat(chat("unpriced-model"), metadata=as_key("k")))
            assert (error.code, error.info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_UNPRICED")
            assert (error.info.metadata["model"], error.info.metadata["subject"]) == ("unpriced-model", "keys/k")
            assert gateway.value("llm_gateway_rate_limit_rejections_total", limit="unpriced") == 1
    warnings = [e for e in logs if e["event"] == "budget_unpriced_model"]
    assert len(warnings) == (1 if policy == "allow" else 0)  # once per model
    budget = daily(1)
    assert backend._spend.get(("keys/k", budget.counter), [0])[0] == 0  # counted as 0, or never reserved
    await gateway.stub.Chat(chat("unpriced-model"), metadata=as_key("free"))  # no budget: no policy


async def test_limits_of_key_and_team_and_their_headers(
    quota_gateway: GatewayMaker, backend: Callable[[], QuotaBackend]
) -> None:
    team = TeamRecord("t", "t", limits=Limits(rpm=3))
    tenants = {"a": tenant("a", Limits(rpm=5), team=team), "b": tenant("b", team=team), "solo": tenant("solo")}
    gateway = await quota_gateway(backend(), tenants, clock=lambda: T0 - 30, rate_limits={"default_rpm": 2})
    call = gateway.stub.Chat(chat("m"), metadata=as_key("a"))
    await call
    headers = dict(await call.trailing_metadata())
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == (
        "3",
        "2",
    )  # the team's
    assert "x-budget-remaining-usd" not in headers
    await gateway.stub.Chat(chat("m"), metadata=as_key("b"))
    call = gateway.stub.Chat(chat("m"), metadata=as_key("b"))  # key b: the default 2 per minute
    await call
    assert dict(await call.trailing_metadata())["x-ratelimit-remaining-requests"] == "0"
    error = await expect_error(gateway.stub.Chat(chat("m"), metadata=as_key("a")))  # the team's 3 are used
    assert error.info.reason == "RATE_LIMIT_EXCEEDED" and error.info.metadata["scope"] == "teams/t"
    assert error.retry is not None and error.retry.retry_delay.seconds == 30
    for _ in range(2):  # another key, no team: its own defaults
        await gateway.stub.Chat(chat("m"), metadata=as_key("solo"))
    error = await expect_error(gateway.stub.Chat(chat("m"), metadata=as_key("solo")))
    assert error.info.metadata["scope"] == "keys/solo"
    for _ in range(2):  # anonymous: the client address, with the defaults
        await gateway.stub.Chat(chat("m"))
    error = await expect_error(gateway.stub.Chat(chat("m")))
    assert error.info.metadata["scope"] == "peer:127.0.0.1"


async def _slots(gateway: QuotaGateway, redis_server: RedisServer | None) -> int:
    await asyncio.sleep(0.1)
    if redis_server is None:
        backend = gateway.quota._backend
        assert isinstance(backend, MemoryQuotas)
        return sum(len(v) for v in backend._streams.values())
    client = redis.Redis(port=redis_server.port)
    try:
        return int(client.zcard("llmgw:{teams/t}:keys/k:streams")) + int(
            client.zcard("llmgw:{teams/t}:teams/t:streams")
        )
    finally:
        client.close()


@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_a_stream_slot_is_released_after_success_failure_and_cancellation(
    quota_gateway: GatewayMaker, request: pytest.FixtureRequest, where: str
) -> None:
    redis_server: RedisServer | None = request.getfixturevalue("redis_server") if where == "redis" else None
    backend: QuotaBackend = RedisQuotas(redis_server.url, 0.25) if redis_server else MemoryQuotas()
    team = TeamRecord("t", "t", limits=Limits(max_concurrent_streams=1), budget=usd(5))
    gateway = await quota_gateway(backend, {"k": tenant("k", Limits(max_concurrent_streams=1), team=team)})
    events = await collect(gateway.stub.ChatStream(chat_stream(PRICED), metadata=as_key("k")))
    assert events[-1].WhichOneof("event") == "final" and await _slots(gateway, redis_server) == 0
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(gateway.stub.ChatStream(chat_stream("stream-error"), metadata=as_key("k")))
    assert await _slots(gateway, redis_server) == 0
    held = gateway.stub.ChatStream(chat_stream("stall-stream"), metadata=as_key("k"))
    await held.read()
    assert await _slots(gateway, redis_server) == 2  # the key's and the team's
    error = await expect_error(collect(gateway.stub.ChatStream(chat_stream(PRICED), metadata=as_key("k"))))
    assert (error.info.reason, error.info.metadata["limit"]) == ("RATE_LIMIT_EXCEEDED", "streams")
    held.cancel()
    assert await _slots(gateway, redis_server) == 0
    events = await collect(gateway.stub.ChatStream(chat_stream(PRICED), metadata=as_key("k")))
    assert events[-1].WhichOneof("event") == "final"


async def test_one_round_trip_before_and_one_after_through_the_server(
    quota_gateway: GatewayMaker, redis_server: RedisServer
) -> None:
    team = TeamRecord("t", "t", limits=Limits(rpm=100, tpm=100_000, max_concurrent_streams=5), budget=usd(5))
    tenants = {"k": tenant("k", Limits(rpm=50, tpm=50_000, max_concurrent_streams=2), usd(1), team=team)}
    backend = RedisQuotas(redis_server.url, 0.25)
    sent = count_round_trips(backend)
    gateway = await quota_gateway(backend, tenants)
    client = redis.Redis(port=redis_server.port)
    await gateway.stub.Chat(chat(PRICED, "warm-up"), metadata=as_key("k"))  # connects, loads the scripts
    await collect(gateway.stub.ChatStream(chat_stream(PRICED, "warm-up"), metadata=as_key("k")))
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: gateway.stub.Chat(chat(PRICED, TEXT), metadata=as_key("k")),
        lambda: collect(gateway.stub.ChatStream(chat_stream(PRICED, TEXT), metadata=as_key("k"))),
        lambda: gateway.stub.Embed(pb.EmbedRequest(model=PRICED, inputs=["a"]), metadata=as_key("k")),
    ]
    for call in calls:
        sent.clear()
        before = evalsha_calls(client)
        await call()
        await asyncio.sleep(0.05)
        assert commands(sent) == ["EVALSHA", "EVALSHA"] and evalsha_calls(client) - before == 2
    client.close()


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_down_with_budgets(quota_gateway: GatewayMaker, redis_server: RedisServer, fail_open: bool) -> None:
    tenants = {"k": tenant("k", Limits(rpm=10), usd(1))}
    gateway = await quota_gateway(RedisQuotas(redis_server.url, 0.25), tenants, rate_limits={"fail_open": fail_open})
    await gateway.stub.Chat(chat(PRICED, TEXT), metadata=as_key("k"))
    redis_server.kill()
    started = time.monotonic()
    if fail_open:
        reply = await gateway.stub.Chat(chat(PRICED, "after redis died"), metadata=as_key("k"))
        assert reply.message.content[0].text == "echo: after redis died"
    else:
        error = await expect_error(gateway.stub.Chat(chat(PRICED, "after redis died"), metadata=as_key("k")))
        assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, "RATE_LIMITER_UNAVAILABLE")
    assert time.monotonic() - started < 2.0
    action = "fail_open" if fail_open else "fail_closed"
    assert gateway.value("llm_gateway_state_backend_errors_total", component="rate_limit", action=action) == 1


async def test_two_gateways_on_one_redis_stay_within_one_call_of_the_budget(
    quota_gateway: GatewayMaker, redis_server: RedisServer
) -> None:
    """Two gateways (each its own interceptor and Redis client) and one key with a budget of B:
    60 concurrent calls; the admitted calls' real total is at most B + one call's cost, and every
    refusal is BUDGET_EXCEEDED."""
    limit = 10 * CALL_COST + CALL_COST // 2
    tenants = {"k": tenant("k", budget=Budget(limit, BudgetPeriod.DAILY))}
    gateways = [await quota_gateway(RedisQuotas(redis_server.url, 1.0), tenants) for _ in range(2)]
    calls = [
        gateways[i % 2].stub.Chat(chat(PRICED, TEXT + str(i), generation=BOUNDED), metadata=as_key("k"))
        for i in range(60)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = [r for r in results if isinstance(r, pb.ChatResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    total = sum(usd_to_nano(r.cost.total_usd) for r in ok)
    assert total <= limit + CALL_COST
    assert {(await expect_error(_raise(r))).info.reason for r in refused} == {"BUDGET_EXCEEDED"}
    assert len(ok) >= limit // ESTIMATE  # and the budget was not refused early
