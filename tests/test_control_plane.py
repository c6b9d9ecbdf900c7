"""The control plane end to end: the admin API served by the real gateway (`app.start_server`),
keys created through it authenticating data-plane calls, the usage ledger answering QueryUsage,
revocation and budgets across two gateway processes on one Redis and one PostgreSQL, and the
`--workers` refusal without Redis.

Each test runs on SQLite and on the machine's PostgreSQL (its own schema) where a store is
involved; two-process tests run the real `llm-gateway serve` CLI.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_gateway.admin.v1 import admin_pb2 as apb
from llm_gateway.admin.v1 import admin_pb2_grpc as apb_grpc
from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc

from .conftest import (
    FAST_RECONNECT,
    GATEWAY_PROCESSES,
    GatewayFactory,
    PostgresSchema,
    RedisServer,
    chat,
    chat_stream,
    collect,
    expect_error,
    free_port,
)
from .emulators.openai_server import OpenAIEmulator

ADMIN_KEY = "admin-test-credential-0123456789"
ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store: a SQLite file, or a schema of the machine's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'control.db'}"
    else:
        schema: PostgresSchema = request.getfixturevalue("postgres_url")
        yield schema.url


async def _query_until(admin: Any, request: apb.QueryUsageRequest, requests: int, timeout_s: float = 5.0) -> Any:
    """QueryUsage until its totals count `requests` calls (the ledger flushes every second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = await admin.QueryUsage(request, metadata=ADMIN, timeout=5)
        if sum(row.requests for row in response.rows) >= requests or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.1)


async def test_team_key_chat_usage_revoke(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, database_url: str
) -> None:
    """The README's walk, through stubs: a team and a key, a Chat with the key, its tokens and
    cost in QueryUsage, RevokeKey, then the key is refused."""
    gateway = await make_gateway(
        {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": openai_upstream.base_url},
        database_url=database_url,
        admin_key=ADMIN_KEY,
    )
    admin = apb_grpc.AdminServiceStub(gateway.channel)
    # No key yet: a loopback gateway serves anonymously.
    await gateway.stub.Chat(chat("gpt-4o-mini"), timeout=10)

    team = await admin.CreateTeam(
        apb.CreateTeamRequest(team=apb.Team(display_name="Search"), team_id="search"), metadata=ADMIN, timeout=5
    )
    assert team.name == "teams/search"
    created = await admin.CreateKey(
        apb.CreateKeyRequest(
            key=apb.Key(display_name="search-prod", team="teams/search", allowed_models=["gpt-4o*"]),
            key_id="search-prod",
        ),
        metadata=ADMIN,
        timeout=5,
    )
    assert created.secret.startswith("sk-gw-") and created.key.name == "keys/search-prod"

    # A key exists: auth applies to every call now.
    refused = await expect_error(gateway.stub.Chat(chat("gpt-4o-mini"), timeout=10))
    assert (refused.code, refused.info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")
    answer = await gateway.stub.Chat(chat("gpt-4o-mini"), metadata=bearer(created.secret), timeout=10)
    assert answer.usage.input_tokens > 0 and answer.cost.total_usd > 0
    not_allowed = await expect_error(gateway.stub.Chat(chat("llama3.2"), metadata=bearer(created.secret), timeout=10))
    assert (not_allowed.code, not_allowed.info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED")

    usage = await _query_until(
        admin,
        apb.QueryUsageRequest(
            filter=apb.UsageFilter(key="keys/search-prod", model="gpt-4o-mini"),
            group_by=[apb.USAGE_GROUP_BY_KEY, apb.USAGE_GROUP_BY_TEAM, apb.USAGE_GROUP_BY_MODEL],
        ),
        1,
    )
    (row,) = usage.rows
    assert (row.key, row.team, row.model, row.requests, row.errors) == (
        "keys/search-prod",
        "teams/search",
        "gpt-4o-mini",
        1,
        0,
    )
    assert (row.input_tokens, row.output_tokens) == (answer.usage.input_tokens, answer.usage.output_tokens)
    assert row.cost_usd == pytest.approx(answer.cost.total_usd, abs=1e-9)
    spend = await admin.GetSpend(apb.GetSpendRequest(name="teams/search"), metadata=ADMIN, timeout=5)
    assert spend.spend_usd == pytest.approx(answer.cost.total_usd, abs=1e-9)

    revoked = await admin.RevokeKey(apb.RevokeKeyRequest(name="keys/search-prod"), metadata=ADMIN, timeout=5)
    assert revoked.HasField("revoke_time")
    after = await expect_error(gateway.stub.Chat(chat("gpt-4o-mini"), metadata=bearer(created.secret), timeout=10))
    assert (after.code, after.info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")
    # Revoking the last key does not open the gateway to anonymous calls again.
    anonymous = await expect_error(gateway.stub.Chat(chat("gpt-4o-mini"), timeout=10))
    assert (anonymous.code, anonymous.info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")
    assert created.secret not in str(await admin.GetKey(apb.GetKeyRequest(name="keys/search-prod"), metadata=ADMIN))


async def test_admin_service_in_health_and_reflection(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator
) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    gateway = await make_gateway({"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": openai_upstream.base_url})
    health = health_pb2_grpc.HealthStub(gateway.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service="llm_gateway.admin.v1.AdminService"))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(gateway.channel)
    responses = [
        r async for r in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    ]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"llm_gateway.v1.LLMGatewayService", "llm_gateway.admin.v1.AdminService"} <= names
    # No admin credential configured: the admin API says how to set one.
    error = await expect_error(apb_grpc.AdminServiceStub(gateway.channel).ListKeys(apb.ListKeysRequest()))
    assert (error.code, error.info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "ADMIN_KEY_INVALID")
    assert "LLM_GATEWAY_ADMIN_KEY" in error.message


async def test_admin_on_its_own_port_or_disabled(make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator) -> None:
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": openai_upstream.base_url}
    apart = await make_gateway(env, admin_key=ADMIN_KEY, admin={"port": 0})
    assert apart.running.admin_port not in (None, apart.running.port)
    on_main = await _code(apb_grpc.AdminServiceStub(apart.channel).ListKeys(apb.ListKeysRequest(), metadata=ADMIN))
    assert on_main == grpc.StatusCode.UNIMPLEMENTED
    async with grpc.aio.insecure_channel(f"127.0.0.1:{apart.running.admin_port}") as channel:
        listed = await apb_grpc.AdminServiceStub(channel).ListKeys(apb.ListKeysRequest(), metadata=ADMIN, timeout=5)
        assert list(listed.keys) == []
        data_plane = await _code(pb_grpc.LLMGatewayServiceStub(channel).Chat(chat("gpt-4o-mini"), timeout=5))
        assert data_plane == grpc.StatusCode.UNIMPLEMENTED

    disabled = await make_gateway(env, admin_key=ADMIN_KEY, admin={"enabled": False})
    assert disabled.running.admin_port is None
    off = await _code(apb_grpc.AdminServiceStub(disabled.channel).ListKeys(apb.ListKeysRequest(), metadata=ADMIN))
    assert off == grpc.StatusCode.UNIMPLEMENTED


# ------------------------------------------------------------------------- two gateway processes


class Served:
    """A `llm-gateway serve` process on a free port."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        self._out = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llm_gateway_server", "serve", "--port", str(self.port)],
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=FAST_RECONNECT)
        self.stub = pb_grpc.LLMGatewayServiceStub(self.channel)
        self.admin = apb_grpc.AdminServiceStub(self.channel)

    async def ready(self) -> None:
        try:
            await asyncio.wait_for(self.channel.channel_ready(), 30)
        except TimeoutError:
            raise AssertionError(f"gateway did not start:\n{self.log.read_text()[-3000:]}") from None

    async def close(self) -> None:
        await self.channel.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._out.close()


@pytest.fixture
async def two_gateways(
    tmp_path: Path, openai_upstream: OpenAIEmulator, redis_server: RedisServer, postgres_url: PostgresSchema
) -> AsyncIterator[tuple[Served, Served]]:
    env = {
        **os.environ,
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": openai_upstream.base_url,
        "LLM_GATEWAY_METRICS_PORT": "0",
        "LLM_GATEWAY_RETRY__MAX_ATTEMPTS": "1",
        "LLM_GATEWAY_DATABASE_URL": postgres_url.url,
        "REDIS_URL": redis_server.url,
        "LLM_GATEWAY_ADMIN_KEY": ADMIN_KEY,
    }
    a = Served(env, tmp_path / "a.log")
    b = Served(env, tmp_path / "b.log")
    try:
        await a.ready()
        await b.ready()
        yield a, b
    finally:
        await a.close()
        await b.close()


@GATEWAY_PROCESSES
async def test_two_processes_revocation_reaches_the_other_within_a_second(
    two_gateways: tuple[Served, Served],
) -> None:
    a, b = two_gateways
    created = await a.admin.CreateKey(apb.CreateKeyRequest(key=apb.Key(display_name="shared")), metadata=ADMIN)
    key = bearer(created.secret)
    await b.stub.Chat(chat("gpt-4o-mini"), metadata=key, timeout=10)  # B knows (and caches) the key
    await a.admin.RevokeKey(apb.RevokeKeyRequest(name=created.key.name), metadata=ADMIN, timeout=5)
    revoked_at = time.monotonic()
    while True:
        try:
            await b.stub.Chat(chat("gpt-4o-mini"), metadata=key, timeout=10)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            break
        assert time.monotonic() - revoked_at < 1.0, "B still accepts the key a second after A revoked it"
        await asyncio.sleep(0.02)
    took = time.monotonic() - revoked_at
    print(f"revoked through A, refused by B after {took * 1000:.0f} ms")
    assert took < 1.0


@GATEWAY_PROCESSES
async def test_two_processes_share_one_budget(two_gateways: tuple[Served, Served]) -> None:
    """A key with a budget of B USD used through both gateways at once: the admitted calls' total
    cost stays within B plus one call's maximum cost, and every refusal is BUDGET_EXCEEDED."""
    a, b = two_gateways
    limit_usd = 0.0001  # about 17 calls of the emulator's answer (11 input, 7 output tokens)
    created = await a.admin.CreateKey(
        apb.CreateKeyRequest(
            key=apb.Key(display_name="budgeted", budget=apb.Budget(limit_usd=limit_usd, period=apb.BUDGET_PERIOD_DAILY))
        ),
        metadata=ADMIN,
    )
    key = bearer(created.secret)
    costs: list[float] = []
    refusals: list[str] = []

    async def caller(gateway: Served, stream: bool) -> None:
        for _ in range(30):
            try:
                if stream:
                    events = await collect(
                        gateway.stub.ChatStream(
                            chat_stream("gpt-4o-mini", generation=pb.GenerationOptions(max_output_tokens=16)),
                            metadata=key,
                            timeout=10,
                        )
                    )
                    costs.append(events[-1].final.cost.total_usd)
                else:
                    answer = await gateway.stub.Chat(
                        chat("gpt-4o-mini", generation=pb.GenerationOptions(max_output_tokens=16)),
                        metadata=key,
                        timeout=10,
                    )
                    costs.append(answer.cost.total_usd)
            except grpc.aio.AioRpcError as error:
                details = await expect_error(_failed(error))
                refusals.append(f"{details.code.name}/{details.info.reason}")

    await asyncio.gather(*(caller(g, s) for g in (a, b) for s in (False, True) for _ in range(2)))
    one_call_max = (11 * 0.15 + 16 * 0.60) / 1e6  # input estimate is above 11 tokens' cost; 16 output tokens
    print(f"admitted {len(costs)} calls costing {sum(costs):.9f} USD; {len(refusals)} refused; budget {limit_usd}")
    assert costs and refusals
    assert sum(costs) <= limit_usd + one_call_max
    assert set(refusals) == {"RESOURCE_EXHAUSTED/BUDGET_EXCEEDED"}
    spend = await a.admin.GetSpend(apb.GetSpendRequest(name=created.key.name), metadata=ADMIN, timeout=5)
    assert spend.limit_usd == pytest.approx(limit_usd) and spend.period == apb.BUDGET_PERIOD_DAILY


async def _failed(error: grpc.aio.AioRpcError) -> Any:
    raise error


async def _code(call: Any) -> grpc.StatusCode:
    """The status code of a call that must fail (UNIMPLEMENTED carries no rich details)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


# --------------------------------------------------------------------------------- --workers


@GATEWAY_PROCESSES
def test_workers_refuse_limits_without_redis(tmp_path: Path) -> None:
    env = {**os.environ, "LLM_GATEWAY_METRICS_PORT": "0", "LLM_GATEWAY_RATE_LIMITS__DEFAULT_RPM": "60"}
    env.pop("REDIS_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "llm_gateway_server", "serve", "--port", str(free_port()), "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("llm-gateway:")]
    assert len(lines) == 1 and "no Redis" in lines[0] and "--workers" in lines[0], result.stderr


@GATEWAY_PROCESSES
def test_workers_refuse_budgets_in_the_database_without_redis(tmp_path: Path) -> None:
    from llm_gateway_server.config import StoreSettings
    from llm_gateway_server.store.sql import open_store
    from llm_gateway_server.tenancy.records import Budget, BudgetPeriod, KeyRecord

    from .conftest import run_async

    url = f"sqlite:///{tmp_path / 'gateway.db'}"

    async def seed() -> None:
        store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}", StoreSettings())
        try:
            await store.create_key(
                KeyRecord(
                    id="batch",
                    display_name="batch",
                    secret_sha256="a" * 64,
                    budget=Budget(10_000_000, BudgetPeriod.MONTHLY),
                )
            )
        finally:
            await store.aclose()

    run_async(seed)
    env = {**os.environ, "LLM_GATEWAY_METRICS_PORT": "0", "LLM_GATEWAY_DATABASE_URL": url}
    env.pop("REDIS_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "llm_gateway_server", "serve", "--port", str(free_port()), "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "keys/batch" in result.stderr and "no Redis" in result.stderr


async def test_a_worker_without_redis_refuses_admin_budgets(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator
) -> None:
    """A `--workers` worker (SO_REUSEPORT) without Redis: the admin API refuses limits and budgets,
    which each worker would count alone."""
    gateway = await make_gateway(
        {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": openai_upstream.base_url},
        admin_key=ADMIN_KEY,
        reuse_port=True,
    )
    admin = apb_grpc.AdminServiceStub(gateway.channel)
    error = await expect_error(
        admin.CreateKey(
            apb.CreateKeyRequest(key=apb.Key(display_name="k", limits=apb.Limits(rpm=10))), metadata=ADMIN, timeout=5
        )
    )
    assert (error.code, error.info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "QUOTA_NEEDS_SHARED_STATE")
    plain = await admin.CreateKey(apb.CreateKeyRequest(key=apb.Key(display_name="plain")), metadata=ADMIN, timeout=5)
    assert plain.secret
    rotated = await admin.RotateKey(
        apb.RotateKeyRequest(name=plain.key.name, grace_period=duration_pb2.Duration(seconds=60)), metadata=ADMIN
    )
    assert rotated.secret != plain.secret


async def test_budget_gauges_and_spend_metric(make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator) -> None:
    """A budgeted key's call sets `llm_gateway_budget_spend_usd` / `_limit_usd` (subject
    `keys/{id}`, what the "Budget used" panel and GatewayBudgetNearlySpent read) and counts its
    cost in `llm_gateway_spend_usd_total`."""
    import urllib.request

    metrics_port = free_port()
    gateway = await make_gateway(
        {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": openai_upstream.base_url},
        admin_key=ADMIN_KEY,
        metrics_port=metrics_port,
    )
    admin = apb_grpc.AdminServiceStub(gateway.channel)
    created = await admin.CreateKey(
        apb.CreateKeyRequest(
            key=apb.Key(display_name="gauged", budget=apb.Budget(limit_usd=2.5, period=apb.BUDGET_PERIOD_MONTHLY)),
            key_id="gauged",
        ),
        metadata=ADMIN,
        timeout=5,
    )
    answer = await gateway.stub.Chat(
        chat("gpt-4o-mini", generation=pb.GenerationOptions(max_output_tokens=16)),
        metadata=bearer(created.secret),
        timeout=10,
    )
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    )
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("llm_")
    }
    assert values['llm_gateway_budget_limit_usd{subject="keys/gauged"}'] == 2.5
    reserved = values['llm_gateway_budget_spend_usd{subject="keys/gauged"}']
    assert 0 < reserved <= (11 * 0.15 + 16 * 0.60) / 1e6 * 2  # the first call's reservation
    spent = values['llm_gateway_spend_usd_total{key="gauged",team=""}']
    assert spent == pytest.approx(answer.cost.total_usd, abs=1e-9)
