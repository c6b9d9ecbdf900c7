"""Quotas (rate limits, stream slots and budgets of a key and its team) in one backend call before a
call and one after: the backends driven directly (in memory and on a real `redis-server`), and the
interceptor through a real grpc.aio server with the real servicer, router and OpenAI emulator.

In the server tests the auth layer is replaced by `TenantLayer`, which puts a `Tenant` on the call
record from the `x-api-key` metadata the way the key cache does, so these tests do not depend on
how keys are stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import structlog
from google.rpc import error_details_pb2, status_pb2
from redis.asyncio.connection import Connection as RedisConnection
from redis.crc import key_slot

from llm_gateway.admin.v1 import admin_pb2 as apb
from llm_gateway.admin.v1 import admin_pb2_grpc as apb_grpc
from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway_server.config import load_settings
from llm_gateway_server.interceptors.quota import request_token_estimate
from llm_gateway_server.providers.registry import build_registry
from llm_gateway_server.routing.catalog import load_catalog
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
from llm_gateway_server.tenancy.records import (
    BudgetPeriod,
    period_bounds,
    usd_to_nano,
)

from .conftest import (
    Gateway,
    GatewayFactory,
    RedisServer,
    RichError,
    chat,
    chat_stream,
    collect,
    copy_sqlite_template,
    expect_error,
    free_port,
    rich_error,
)
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
    environ = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    settings = load_settings(environ=environ, overrides=overrides)
    return Resolver(load_catalog(settings.models), build_registry(settings.providers, environ), settings.aliases)


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


# --- budgets through the real gateway ---------------------------------------------------------
#
# The full server (`make_gateway`: auth, key cache, ledger, quota, cache), keys and teams created
# through the admin API (their limits and budgets travel as the key cache's `Tenant`).

ADMIN_KEY = "admin-quota-credential-0123456789"
ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)


@dataclass
class Admin:
    gateway: Gateway
    stub: apb_grpc.AdminServiceStub

    async def team(self, team_id: str, limits: apb.Limits | None = None, budget: apb.Budget | None = None) -> None:
        team = apb.Team(display_name=team_id, limits=limits, budget=budget)
        await self.stub.CreateTeam(apb.CreateTeamRequest(team=team, team_id=team_id), metadata=ADMIN, timeout=5)

    async def key(
        self, key_id: str, team: str = "", limits: apb.Limits | None = None, budget: apb.Budget | None = None
    ) -> tuple[tuple[str, str], ...]:
        key = apb.Key(display_name=key_id, team=f"teams/{team}" if team else "", limits=limits, budget=budget)
        created = await self.stub.CreateKey(apb.CreateKeyRequest(key=key, key_id=key_id), metadata=ADMIN, timeout=5)
        return (("authorization", f"Bearer {created.secret}"),)

    async def ledger_spend(self, name: str, at_least: float = 0.0) -> float:
        """GetSpend (the ledger) once it has reached `at_least` USD (it flushes every second)."""
        deadline = time.monotonic() + 5
        while True:
            spend = await self.stub.GetSpend(apb.GetSpendRequest(name=name), metadata=ADMIN, timeout=5)
            if spend.spend_usd >= at_least or time.monotonic() > deadline:
                return float(spend.spend_usd)
            await asyncio.sleep(0.1)

    def quotas(self) -> QuotaBackend:
        return next(b for b in self.gateway.running.application.backends if isinstance(b, QuotaBackend))

    def rejections(self, limit: str) -> float:
        metrics = self.gateway.running.metrics
        assert metrics is not None
        return metrics.registry.get_sample_value("llm_gateway_rate_limit_rejections_total", {"limit": limit}) or 0.0


AdminMaker = Callable[..., Awaitable[Admin]]


@pytest.fixture
async def admin_gateway(make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator) -> AdminMaker:
    """Factory: a gateway on the OpenAI emulator, the priced models configured, the admin API on."""

    async def make(redis_url: str | None = None, **overrides: Any) -> Admin:
        gateway = await make_gateway(
            {"OPENAI_BASE_URL": openai_upstream.base_url},
            redis_url=redis_url,
            admin_key=ADMIN_KEY,
            models=MODELS,
            metrics_port=free_port(),
            **overrides,
        )
        return Admin(gateway, apb_grpc.AdminServiceStub(gateway.channel))

    return make


@pytest.fixture(params=["memory", "redis"])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    """None for the in-memory backend, else a real Redis."""
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


def budget_usd(value: float, period: int = apb.BUDGET_PERIOD_DAILY) -> apb.Budget:
    return apb.Budget(limit_usd=value, period=period)  # type: ignore[arg-type]


def quota_failure(error: grpc.aio.AioRpcError) -> error_details_pb2.QuotaFailure:
    raw = next(v for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin")
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            return failure
    raise AssertionError("no QuotaFailure")


async def refusal(call: Awaitable[Any]) -> tuple[grpc.aio.AioRpcError, RichError]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value, rich_error(caught.value)


async def test_a_key_budget_is_enforced_with_quota_failure_and_retry_info(
    admin_gateway: AdminMaker, redis_url: str | None
) -> None:
    admin = await admin_gateway(redis_url)
    key = await admin.key("k1", budget=budget_usd(3 * CALL_COST / 1e9))
    stub = admin.gateway.stub
    remaining = []
    for _ in range(3):
        call = stub.Chat(chat(PRICED, TEXT, generation=BOUNDED), metadata=key)
        await call
        remaining.append(dict(await call.trailing_metadata())["x-budget-remaining-usd"])
    # after each call's reservation (28,000 nano-USD) on top of the calls settled before it
    assert remaining == [f"{max(3 * CALL_COST - ESTIMATE - n * CALL_COST, 0) / 1e9:.9f}" for n in range(3)]
    raw, error = await refusal(stub.Chat(chat(PRICED, TEXT, generation=BOUNDED), metadata=key))
    assert (error.code, error.info.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "BUDGET_EXCEEDED")
    assert error.info.metadata["subject"] == "keys/k1" and error.info.metadata["period"] == "daily"
    assert float(error.info.metadata["spend_usd"]) == pytest.approx(3 * CALL_COST / 1e9)
    until_midnight = DAY_END - time.time()
    assert error.retry is not None and abs(error.retry.retry_delay.seconds - until_midnight) < 5
    violation = quota_failure(raw).violations[0]
    assert violation.subject == "keys/k1" and "daily" in violation.description
    assert admin.rejections("budget") == 1
    assert await admin.ledger_spend("keys/k1", 3 * CALL_COST / 1e9) == pytest.approx(3 * CALL_COST / 1e9)


async def test_a_lifetime_budget_has_no_retry_info(admin_gateway: AdminMaker) -> None:
    admin = await admin_gateway()
    key = await admin.key("k1", budget=budget_usd(1e-9, apb.BUDGET_PERIOD_TOTAL))
    await admin.gateway.stub.Chat(chat(PRICED, TEXT), metadata=key)
    error = await expect_error(admin.gateway.stub.Chat(chat(PRICED, TEXT), metadata=key))
    assert error.info.reason == "BUDGET_EXCEEDED" and error.info.metadata["period"] == "total"
    assert error.retry is None and "lifetime" in error.message


async def test_a_team_budget_counts_every_key_of_the_team(admin_gateway: AdminMaker, redis_url: str | None) -> None:
    admin = await admin_gateway(redis_url)
    await admin.team("t1", budget=budget_usd(2 * CALL_COST / 1e9, apb.BUDGET_PERIOD_MONTHLY))
    a = await admin.key("a", team="t1")
    b = await admin.key("b", team="t1", budget=budget_usd(10))
    await admin.gateway.stub.Chat(chat(PRICED, TEXT, generation=BOUNDED), metadata=a)
    await admin.gateway.stub.Chat(chat(PRICED, TEXT, generation=BOUNDED), metadata=b)
    raw, error = await refusal(admin.gateway.stub.Chat(chat(PRICED, TEXT), metadata=a))
    assert error.info.metadata["subject"] == "teams/t1" and error.info.metadata["period"] == "monthly"
    assert quota_failure(raw).violations[0].subject == "teams/t1"


async def test_a_restart_keeps_the_period_spend(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, tmp_path: Path, migrated_sqlite_template: Path
) -> None:
    """In memory the counters die with the process; the next one seeds them from the ledger."""
    url = copy_sqlite_template(migrated_sqlite_template, tmp_path)

    async def gateway() -> Admin:
        served = await make_gateway(
            {"OPENAI_BASE_URL": openai_upstream.base_url}, admin_key=ADMIN_KEY, models=MODELS, database_url=url
        )
        return Admin(served, apb_grpc.AdminServiceStub(served.channel))

    first = await gateway()
    key = await first.key("k1", budget=budget_usd(2 * CALL_COST / 1e9))
    for _ in range(2):
        await first.gateway.stub.Chat(chat(PRICED, TEXT, generation=BOUNDED), metadata=key)
    await first.gateway.running.stop()  # the drain writes the ledger
    second = await gateway()
    error = await expect_error(second.gateway.stub.Chat(chat(PRICED, TEXT), metadata=key))
    assert error.info.reason == "BUDGET_EXCEEDED"
    assert float(error.info.metadata["spend_usd"]) == pytest.approx(2 * CALL_COST / 1e9)


async def test_the_real_cost_replaces_the_estimate(admin_gateway: AdminMaker, redis_server: RedisServer) -> None:
    """The budget counter after unary, stream, Embed, a cache hit and a stream that fails after
    content equals the ledger's spend for the key (each call's own cost, 0 for the hit)."""
    admin = await admin_gateway(redis_server.url, cache={"enabled": True})
    key = await admin.key("k", budget=budget_usd(1.0))
    stub = admin.gateway.stub
    quota = daily(1)

    async def counter_after(call: Awaitable[Any]) -> int:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call
        await asyncio.sleep(0.05)
        return spend_of(redis_server, "keys/k", quota, tag="keys/k")

    assert await counter_after(stub.Chat(chat(PRICED, TEXT), metadata=key)) == CALL_COST
    streamed = await counter_after(collect(stub.ChatStream(chat_stream(PRICED, TEXT), metadata=key)))
    assert streamed == 2 * CALL_COST
    embedded = await counter_after(stub.Embed(pb.EmbedRequest(model=PRICED, inputs=["a", "b"]), metadata=key))
    assert embedded == 2 * CALL_COST + 6 * 1000  # the emulator's 3 tokens per input
    assert await counter_after(stub.Chat(chat(PRICED, TEXT), metadata=key)) == embedded  # a cache hit costs 0
    failed = await counter_after(collect(stub.ChatStream(chat_stream("stream-error", TEXT), metadata=key)))
    assert failed < embedded + ESTIMATE  # the estimate was given back, its partial use (if any) kept
    assert await admin.ledger_spend("keys/k", failed / 1e9) == pytest.approx(failed / 1e9, abs=1e-9)


@pytest.mark.parametrize("policy", ["allow", "refuse"])
async def test_unpriced_models_under_a_budget(admin_gateway: AdminMaker, policy: str) -> None:
    admin = await admin_gateway(budgets={"unpriced_models": policy})
    budgeted, free = await admin.key("k", budget=budget_usd(1)), await admin.key("free")
    with structlog.testing.capture_logs() as logs:
        if policy == "allow":
            for _ in range(2):
                await admin.gateway.stub.Chat(chat("unpriced-model"), metadata=budgeted)
        else:
            error = await expect_error(admin.gateway.stub.Chat(chat("unpriced-model"), metadata=budgeted))
            assert (error.code, error.info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_UNPRICED")
            assert (error.info.metadata["model"], error.info.metadata["subject"]) == ("unpriced-model", "keys/k")
            assert admin.rejections("unpriced") == 1
    warnings = [e for e in logs if e["event"] == "budget_unpriced_model"]
    assert len(warnings) == (1 if policy == "allow" else 0)  # once per model
    backend = admin.quotas()
    assert isinstance(backend, MemoryQuotas)
    assert backend._spend.get(("keys/k", daily(1).counter), [0])[0] == 0  # counted as 0, or never reserved
    await admin.gateway.stub.Chat(chat("unpriced-model"), metadata=free)  # no budget: no policy


async def test_limits_of_key_and_team_and_their_headers(admin_gateway: AdminMaker, redis_url: str | None) -> None:
    into = time.time() % 60
    if into > 55:  # fixed one-minute windows: keep the calls in one
        await asyncio.sleep(60 - into + 0.05)
    admin = await admin_gateway(redis_url, rate_limits={"default_rpm": 2})
    await admin.team("t", limits=apb.Limits(rpm=3))
    a = await admin.key("a", team="t", limits=apb.Limits(rpm=5))
    b = await admin.key("b", team="t")
    solo = await admin.key("solo")
    stub = admin.gateway.stub
    call = stub.Chat(chat("m"), metadata=a)
    await call
    headers = dict(await call.trailing_metadata())
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == (
        "3",
        "2",
    )  # the team's
    assert "x-budget-remaining-usd" not in headers
    await stub.Chat(chat("m"), metadata=b)
    call = stub.Chat(chat("m"), metadata=b)  # key b: the default 2 per minute
    await call
    assert dict(await call.trailing_metadata())["x-ratelimit-remaining-requests"] == "0"
    error = await expect_error(stub.Chat(chat("m"), metadata=a))  # the team's 3 are used
    assert error.info.reason == "RATE_LIMIT_EXCEEDED" and error.info.metadata["scope"] == "teams/t"
    assert error.retry is not None and 0 <= error.retry.retry_delay.seconds <= 60
    for _ in range(2):  # a key without a team: its own defaults
        await stub.Chat(chat("m"), metadata=solo)
    error = await expect_error(stub.Chat(chat("m"), metadata=solo))
    assert error.info.metadata["scope"] == "keys/solo"


async def _slots(admin: Admin, redis_server: RedisServer | None) -> int:
    await asyncio.sleep(0.1)
    if redis_server is None:
        backend = admin.quotas()
        assert isinstance(backend, MemoryQuotas)
        return sum(len(v) for v in backend._streams.values())
    client = redis.Redis(port=redis_server.port)
    try:
        return sum(int(client.zcard(f"llmgw:{{teams/t}}:{s}:streams")) for s in ("keys/k", "teams/t"))
    finally:
        client.close()


@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_a_stream_slot_is_released_after_success_failure_and_cancellation(
    admin_gateway: AdminMaker, request: pytest.FixtureRequest, where: str
) -> None:
    redis_server: RedisServer | None = request.getfixturevalue("redis_server") if where == "redis" else None
    admin = await admin_gateway(redis_server.url if redis_server else None)
    await admin.team("t", limits=apb.Limits(max_concurrent_streams=1), budget=budget_usd(5))
    key = await admin.key("k", team="t", limits=apb.Limits(max_concurrent_streams=1))
    stub = admin.gateway.stub
    events = await collect(stub.ChatStream(chat_stream(PRICED), metadata=key))
    assert events[-1].WhichOneof("event") == "final" and await _slots(admin, redis_server) == 0
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(stub.ChatStream(chat_stream("stream-error"), metadata=key))
    assert await _slots(admin, redis_server) == 0
    held = stub.ChatStream(chat_stream("stall-stream"), metadata=key)
    await held.read()
    assert await _slots(admin, redis_server) == 2  # the key's and the team's
    error = await expect_error(collect(stub.ChatStream(chat_stream(PRICED), metadata=key)))
    assert (error.info.reason, error.info.metadata["limit"]) == ("RATE_LIMIT_EXCEEDED", "streams")
    held.cancel()
    assert await _slots(admin, redis_server) == 0
    events = await collect(stub.ChatStream(chat_stream(PRICED), metadata=key))
    assert events[-1].WhichOneof("event") == "final"


async def test_one_round_trip_before_and_one_after_through_the_server(
    admin_gateway: AdminMaker, redis_server: RedisServer
) -> None:
    admin = await admin_gateway(redis_server.url)
    backend = admin.quotas()
    assert isinstance(backend, RedisQuotas)
    sent = count_round_trips(backend)
    await admin.team("t", limits=apb.Limits(rpm=100, tpm=100_000, max_concurrent_streams=5), budget=budget_usd(5))
    key = await admin.key(
        "k", team="t", limits=apb.Limits(rpm=50, tpm=50_000, max_concurrent_streams=2), budget=budget_usd(1)
    )
    stub = admin.gateway.stub
    client = redis.Redis(port=redis_server.port)
    await stub.Chat(chat(PRICED, "warm-up"), metadata=key)  # connects, loads the scripts
    await collect(stub.ChatStream(chat_stream(PRICED, "warm-up"), metadata=key))
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: stub.Chat(chat(PRICED, TEXT), metadata=key),
        lambda: collect(stub.ChatStream(chat_stream(PRICED, TEXT), metadata=key)),
        lambda: stub.Embed(pb.EmbedRequest(model=PRICED, inputs=["a"]), metadata=key),
    ]
    for call in calls:
        await asyncio.sleep(0.05)
        sent.clear()
        before = evalsha_calls(client)
        await call()
        await asyncio.sleep(0.05)
        assert commands(sent) == ["EVALSHA", "EVALSHA"] and evalsha_calls(client) - before == 2
    client.close()


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_down_with_budgets(admin_gateway: AdminMaker, redis_server: RedisServer, fail_open: bool) -> None:
    admin = await admin_gateway(redis_server.url, rate_limits={"fail_open": fail_open})
    key = await admin.key("k", limits=apb.Limits(rpm=10), budget=budget_usd(1))
    await admin.gateway.stub.Chat(chat(PRICED, TEXT), metadata=key)
    redis_server.kill()
    started = time.monotonic()
    if fail_open:
        reply = await admin.gateway.stub.Chat(chat(PRICED, "after redis died"), metadata=key)
        assert reply.message.content[0].text == "echo: after redis died"
    else:
        error = await expect_error(admin.gateway.stub.Chat(chat(PRICED, "after redis died"), metadata=key))
        assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, "RATE_LIMITER_UNAVAILABLE")
    assert time.monotonic() - started < 2.0
    metrics = admin.gateway.running.metrics
    assert metrics is not None
    action = "fail_open" if fail_open else "fail_closed"
    labels = {"component": "rate_limit", "action": action}
    assert metrics.registry.get_sample_value("llm_gateway_state_backend_errors_total", labels) == 1


async def test_two_gateways_on_one_redis_stay_within_one_call_of_the_budget(
    admin_gateway: AdminMaker, redis_server: RedisServer, tmp_path: Path, migrated_sqlite_template: Path
) -> None:
    """Two gateways (each its own quota layer and Redis client) on one store and one Redis, one key
    with a budget of B: 60 concurrent calls; the admitted calls' real total is at most B + one
    call's cost, and every refusal is BUDGET_EXCEEDED."""
    url = copy_sqlite_template(migrated_sqlite_template, tmp_path)
    # a generous Redis timeout: a call timed out under load would fail open, unreserved
    first, second = [await admin_gateway(redis_server.url, database_url=url, redis_timeout_s=5.0) for _ in range(2)]
    limit = 10 * CALL_COST + CALL_COST // 2
    key = await first.key("k", budget=budget_usd(limit / 1e9))
    gateways = [first, second]
    calls = [
        gateways[i % 2].gateway.stub.Chat(chat(PRICED, TEXT + str(i % 10), generation=BOUNDED), metadata=key)
        for i in range(60)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = [r for r in results if isinstance(r, pb.ChatResponse)]
    refused = [rich_error(r) for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert sum(usd_to_nano(r.cost.total_usd) for r in ok) <= limit + CALL_COST
    assert refused and {e.info.reason for e in refused} == {"BUDGET_EXCEEDED"}
    assert len(ok) >= limit // (ESTIMATE + 1000)  # the budget was not refused early
