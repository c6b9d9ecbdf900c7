"""The usage ledger: the batching writer (`tenancy/ledger.py`) against real databases (a SQLite file,
the machine's PostgreSQL, and a throwaway PostgreSQL server stopped and started mid-run), and the
ledger layer (`interceptors/ledger.py`) through the real gRPC server: every call is one record
whose tokens and cost are the call's own.

The store is never mocked: `CountingStore` wraps the real `SqlStore` and only notes the batches
it is given and how each write ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from sqlalchemy import select
from structlog.testing import capture_logs

from llm_gateway.admin.v1 import admin_pb2 as apb
from llm_gateway.admin.v1 import admin_pb2_grpc as apb_grpc
from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc
from llm_gateway_server.config import LedgerSettings, StoreSettings
from llm_gateway_server.estimates import estimate_tokens
from llm_gateway_server.interceptors.auth import hash_key
from llm_gateway_server.store.base import ScopeKind, Store
from llm_gateway_server.store.models import usage_records
from llm_gateway_server.store.sql import SqlStore, open_store, resolve_database_url
from llm_gateway_server.telemetry.metrics import Metrics
from llm_gateway_server.tenancy.ledger import _BACKOFF_CAP_S, LedgerWriter
from llm_gateway_server.tenancy.records import (
    KeyRecord,
    TeamRecord,
    UsageQuery,
    UsageRecord,
    UsageRow,
    usd_to_nano,
)

from .conftest import (
    FAST_RECONNECT,
    OPENAI_TEST_KEY,
    Gateway,
    GatewayFactory,
    PostgresSchema,
    ThrowawayPostgres,
    chat,
    chat_stream,
    collect,
    free_port,
    user,
)
from .emulators.openai_server import OpenAIEmulator

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
STORE = StoreSettings(timeout_s=1.0)


@dataclass
class CountingStore(Store):
    """The real store, noting every `write_usage` call: the request ids of each batch given and
    whether it was written."""

    inner: SqlStore
    batches: list[list[str]] = field(default_factory=list)
    failures: int = 0
    written_ids: list[str] = field(default_factory=list)

    async def write_usage(self, records: Sequence[UsageRecord]) -> None:
        self.batches.append([r.request_id for r in records])
        try:
            await self.inner.write_usage(records)
        except Exception:
            self.failures += 1
            raise
        self.written_ids += [r.request_id for r in records]

    async def query_usage(self, query: UsageQuery) -> list[UsageRow]:
        return await self.inner.query_usage(query)

    async def spend(self, kind: ScopeKind, scope_id: str, since: datetime | None) -> int:
        return await self.inner.spend(kind, scope_id, since)

    async def create_team(self, team: TeamRecord) -> TeamRecord:
        return await self.inner.create_team(team)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        return await self.inner.get_team(team_id)

    async def list_teams(self, after_id: str, limit: int) -> list[TeamRecord]:
        return await self.inner.list_teams(after_id, limit)

    async def update_team(self, team: TeamRecord) -> TeamRecord:
        return await self.inner.update_team(team)

    async def delete_team(self, team_id: str) -> None:
        await self.inner.delete_team(team_id)

    async def create_key(self, key: KeyRecord) -> KeyRecord:
        return await self.inner.create_key(key)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self.inner.get_key(key_id)

    async def find_key(self, secret_sha256: str) -> KeyRecord | None:
        return await self.inner.find_key(secret_sha256)

    async def list_keys(self, team_id: str | None, after_id: str, limit: int, include_revoked: bool) -> list[KeyRecord]:
        return await self.inner.list_keys(team_id, after_id, limit, include_revoked)

    async def update_key(self, key: KeyRecord) -> KeyRecord:
        return await self.inner.update_key(key)

    async def count_keys(self) -> int:
        return await self.inner.count_keys()

    async def ping(self) -> None:
        await self.inner.ping()

    async def aclose(self) -> None:
        await self.inner.aclose()


def record(i: int, key: str = "k1", team: str = "t1", cost: int = 1_000, when: datetime = T0) -> UsageRecord:
    return UsageRecord(
        time=when + timedelta(milliseconds=i),
        request_id=f"r{i:05d}",
        key_id=key,
        team_id=team,
        method="Chat",
        model="m",
        provider="p",
        deployment="p/m",
        input_tokens=10,
        output_tokens=5,
        cost_nano_usd=cost,
        latency_ms=1.0,
    )


async def totals(store: Store) -> UsageRow:
    rows = await store.query_usage(UsageQuery(limit=10))
    return rows[0] if rows else UsageRow()


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Waits until `condition()` holds (fails after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh database: a SQLite file, or its own schema on the machine's PostgreSQL."""
    if request.param == "sqlite":
        url: str = request.getfixturevalue("sqlite_url")
        return url
    schema: PostgresSchema = request.getfixturevalue("postgres_url")
    return schema.url


@pytest.fixture
async def store(database_url: str, tmp_path: Path) -> AsyncIterator[CountingStore]:
    inner = await open_store(resolve_database_url(database_url, tmp_path), STORE)
    counting = CountingStore(inner)
    yield counting
    await inner.aclose()


def writer_for(store: Store, metrics: Metrics | None = None, **settings: Any) -> LedgerWriter:
    return LedgerWriter(store, LedgerSettings(**settings), metrics)


# --- the writer -------------------------------------------------------------------------------


async def test_batches_by_size_in_submit_order(store: CountingStore) -> None:
    metrics = Metrics()
    writer = writer_for(store, metrics, flush_interval_s=60, batch_size=10)
    writer.start()
    ids = [f"r{i:05d}" for i in range(40)]
    for i in range(9):
        writer.submit(record(i))
    await asyncio.sleep(0.3)
    assert store.batches == [] and writer.buffered == 9  # below the size, and the interval is a minute
    for i in range(9, 25):  # the 10th record wakes the writer: it writes what waits, 10 at most at once
        writer.submit(record(i))
    await eventually(lambda: len(store.written_ids) == 25)
    assert store.batches == [ids[0:10], ids[10:20], ids[20:25]]
    for i in range(25, 28):
        writer.submit(record(i))
    await asyncio.sleep(0.3)
    assert writer.buffered == 3
    assert (await totals(store)).requests == 25
    await writer.aclose()  # the drain writes the rest
    assert store.written_ids == ids[:28]
    row = await totals(store)
    assert (row.requests, row.input_tokens, row.output_tokens, row.cost_nano_usd) == (28, 280, 140, 28_000)
    assert sample(metrics, "llm_gateway_ledger_records_written_total") == 28
    assert sample(metrics, "llm_gateway_ledger_buffered_records") == 0
    assert sample(metrics, "llm_gateway_ledger_flush_duration_seconds_count") == 4


async def test_flushes_by_time(store: CountingStore) -> None:
    writer = writer_for(store, flush_interval_s=0.2, batch_size=500)
    writer.start()
    for i in range(3):
        writer.submit(record(i))
    started = time.monotonic()
    await eventually(lambda: len(store.written_ids) == 3, timeout_s=2.0)
    assert time.monotonic() - started < 1.5
    assert store.batches == [["r00000", "r00001", "r00002"]]
    writer.submit(record(3))
    await eventually(lambda: len(store.written_ids) == 4, timeout_s=2.0)
    await writer.aclose()
    assert (await totals(store)).requests == 4


async def test_drain_writes_everything_on_close(store: CountingStore) -> None:
    writer = writer_for(store, flush_interval_s=60, batch_size=1000)
    writer.start()
    for i in range(7):
        writer.submit(record(i))
    await asyncio.sleep(0.1)
    assert store.written_ids == []  # neither the size nor the interval was reached
    await writer.aclose()
    assert store.written_ids == [f"r{i:05d}" for i in range(7)]
    assert writer.dropped == 0


async def test_overflow_is_counted_and_logged(store: CountingStore) -> None:
    metrics = Metrics()
    writer = writer_for(store, metrics, flush_interval_s=60, max_buffered=5)
    with capture_logs() as logs:
        for i in range(8):  # submit is synchronous: the writer takes nothing in between
            writer.submit(record(i))
    assert writer.buffered == 5 and writer.dropped == 3
    assert sample(metrics, "llm_gateway_ledger_records_dropped_total", reason="overflow") == 3
    dropped = [line for line in logs if line["event"] == "ledger_records_dropped"]
    assert dropped and dropped[0]["log_level"] == "error"
    # rate-limited: one line now, the rest are counted until the next line (at the latest, the drain)
    assert len(dropped) == 1 and dropped[0]["dropped"] == {"overflow": 1}
    with capture_logs() as logs:
        await writer.aclose()
    final = [line for line in logs if line["event"] == "ledger_records_dropped"]
    assert final and final[0]["dropped"] == {"overflow": 2} and final[0]["dropped_total"] == 3
    assert store.written_ids == [f"r{i:05d}" for i in range(5)]  # the first five, in order


async def test_after_close_records_are_dropped_and_counted(store: CountingStore) -> None:
    metrics = Metrics()
    writer = writer_for(store, metrics)
    writer.start()
    await writer.aclose()
    writer.submit(record(0))
    assert sample(metrics, "llm_gateway_ledger_records_dropped_total", reason="closed") == 1
    assert store.batches == []


async def test_pending_spend_and_exact_spend(store: CountingStore) -> None:
    writer = writer_for(store, flush_interval_s=60, batch_size=3)
    writer.start()
    for i in range(3):  # one full batch: written
        writer.submit(record(i, key="k1", team="t1", cost=100))
    await eventually(lambda: len(store.written_ids) == 3)
    writer.submit(record(3, key="k1", team="t1", cost=1_000))
    writer.submit(record(4, key="k2", team="t1", cost=10_000))
    writer.submit(replace(record(5, key="k1", team="", cost=100_000), time=T0 - timedelta(days=1)))
    assert writer.pending_spend("key", "k1", None) == 101_000
    assert writer.pending_spend("key", "k1", T0) == 1_000
    assert writer.pending_spend("team", "t1", None) == 11_000
    assert writer.pending_spend("key", "k3", None) == 0
    # GetSpend's sum: the database's plus what is not written yet, nothing twice
    assert await writer.spend("key", "k1", None) == 300 + 101_000
    assert await writer.spend("team", "t1", T0) == 300 + 11_000
    await writer.aclose()
    assert writer.pending_spend("key", "k1", None) == 0
    assert await store.spend("key", "k1", None) == 300 + 101_000


async def test_retries_with_backoff_while_postgres_is_down_then_catches_up(
    throwaway_postgres: ThrowawayPostgres, tmp_path: Path
) -> None:
    inner = await open_store(resolve_database_url(throwaway_postgres.url, tmp_path), STORE)
    store = CountingStore(inner)
    metrics = Metrics()
    writer = writer_for(store, metrics, flush_interval_s=0.1, batch_size=50)
    writer.start()
    ids = [f"r{i:05d}" for i in range(60)]
    for i in range(10):
        writer.submit(record(i))
    await eventually(lambda: len(store.written_ids) == 10)

    with capture_logs() as logs:
        await asyncio.to_thread(throwaway_postgres.stop)
        for i in range(10, 60):  # calls go on for 5 s while the database is away
            writer.submit(record(i))
            await asyncio.sleep(0.1)
        attempts_while_down = len(store.batches) - 1
        assert store.written_ids == ids[:10] and writer.buffered == 50 and writer.dropped == 0
        await asyncio.to_thread(throwaway_postgres.start)
        up_at = time.monotonic()
        await eventually(lambda: len(store.written_ids) == 60, timeout_s=10)
        caught_up_s = time.monotonic() - up_at
    # backoff: a handful of attempts in the 5 s outage, not one per flush interval (50)
    assert 3 <= attempts_while_down <= 15, store.batches
    assert caught_up_s < _BACKOFF_CAP_S + 1.5, f"{caught_up_s:.2f} s after the database came back"
    assert store.written_ids == ids  # nothing lost, nothing twice, in submit order
    assert sample(metrics, "llm_gateway_ledger_flush_failures_total") == store.failures >= 3
    assert sample(metrics, "llm_gateway_ledger_records_dropped_total", reason="overflow") == 0
    failed = [line for line in logs if line["event"] == "ledger_write_failed"]
    assert 1 <= len(failed) <= 2 and failed[0]["log_level"] == "warning"  # rate-limited, not one per retry
    assert "postgres" in failed[0]["error"].lower() or "127.0.0.1" in failed[0]["error"]
    recovered = [line for line in logs if line["event"] == "ledger_store_recovered"]
    assert len(recovered) == 1 and recovered[0]["outage_s"] >= 4.0  # from the first failure to the write
    row = await totals(store)
    assert (row.requests, row.cost_nano_usd) == (60, 60_000)
    await writer.aclose()
    await inner.aclose()


async def test_drain_timeout_while_postgres_is_down_counts_and_logs_the_loss(
    throwaway_postgres: ThrowawayPostgres, tmp_path: Path
) -> None:
    inner = await open_store(resolve_database_url(throwaway_postgres.url, tmp_path), STORE)
    metrics = Metrics()
    writer = writer_for(inner, metrics, flush_interval_s=0.1, drain_timeout_s=0.5)
    writer.start()
    await asyncio.to_thread(throwaway_postgres.stop)
    for i in range(5):
        writer.submit(record(i))
    started = time.monotonic()
    with capture_logs() as logs:
        await writer.aclose()
    assert time.monotonic() - started < 1.5
    assert sample(metrics, "llm_gateway_ledger_records_dropped_total", reason="drain") == 5
    lost = [line for line in logs if line["event"] == "ledger_drain_incomplete"]
    assert len(lost) == 1 and lost[0]["records_lost"] == 5 and lost[0]["log_level"] == "error"
    assert any(line["event"] == "ledger_records_dropped" for line in logs)
    await inner.aclose()


async def test_a_record_the_database_refuses_is_dropped_alone(store: CountingStore) -> None:
    metrics = Metrics()
    writer = writer_for(store, metrics, flush_interval_s=0.05)
    bad = replace(record(1), input_tokens=2**70)  # beyond BIGINT on both databases
    with capture_logs() as logs:
        writer.start()
        for r in (record(0), bad, record(2)):
            writer.submit(r)
        await eventually(lambda: writer.buffered == 0, timeout_s=15)
        await writer.aclose()
    assert store.written_ids == ["r00000", "r00002"]
    assert sample(metrics, "llm_gateway_ledger_records_dropped_total", reason="rejected") == 1
    rejected = [line for line in logs if line["event"] == "ledger_record_rejected"]
    assert [line["request_id"] for line in rejected] == ["r00001"]


# --- through the real gRPC server --------------------------------------------------------------

KEY_A, KEY_R = "gw-ledger-key-a-0001", "gw-ledger-key-r-0002"
PRICE = {"input_per_million_usd": 2.0, "output_per_million_usd": 8.0}
GATEWAY_SETTINGS: dict[str, Any] = {
    "auth": {
        "keys": [
            {"id": "a1", "owner": "team-a", "key_sha256": hash_key(KEY_A)},
            {"id": "r1", "key_sha256": hash_key(KEY_R), "rpm": 1},
        ]
    },
    "cache": {"enabled": True},
    "models": [
        {"id": "ledger-fail", "provider": "openai", "provider_model": "status-500", "pricing": PRICE},
        {"id": "ledger-cut", "provider": "openai", "provider_model": "stream-error", "pricing": PRICE},
        {"id": "ledger-stall", "provider": "openai", "provider_model": "stall-stream", "pricing": PRICE},
        {"id": "ledger-hang", "provider": "openai", "provider_model": "hang", "pricing": PRICE},
    ],
    "ledger": {"flush_interval_s": 0.2},
}


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def read_ledger(database_url: str) -> tuple[UsageRow, list[dict[str, Any]]]:
    """The ledger's totals and every row in insert order, read from the database with a store of
    the test's own."""
    reader = await open_store(resolve_database_url(database_url, Path("/nonexistent")), STORE, migrate=False)
    try:
        async with reader.engine.connect() as conn:
            result = await conn.execute(select(usage_records).order_by(usage_records.c.id))
            rows = [dict(row) for row in result.mappings()]
        return await totals(reader), rows
    finally:
        await reader.aclose()


@dataclass
class LedgerGateway:
    """A running gateway (the application wires the ledger right after auth), its ledger writer,
    and its database, read through a store of the test's own."""

    gateway: Gateway
    writer: LedgerWriter
    database_url: str

    async def stop(self) -> None:
        """Stops serving (every call finishes), which drains the ledger and closes its store."""
        await self.gateway.channel.close()
        await self.gateway.running.stop()

    async def read(self) -> tuple[UsageRow, list[dict[str, Any]]]:
        """The ledger's totals and rows (see `read_ledger`)."""
        return await read_ledger(self.database_url)

    def metric(self, name: str, **labels: str) -> float:
        metrics = self.gateway.running.metrics
        assert metrics is not None
        return sample(metrics, name, **labels)


LedgerGatewayFactory = Callable[..., Awaitable[LedgerGateway]]


@pytest.fixture
async def ledger_gateway(make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator) -> LedgerGatewayFactory:
    """Factory: `await ledger_gateway(database_url, **settings)`: a gateway on the OpenAI emulator
    (GATEWAY_SETTINGS, then `settings`) whose control plane uses the database at `database_url`."""

    async def make(database_url: str, **overrides: Any) -> LedgerGateway:
        env = {"OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": openai_upstream.base_url}
        settings = {**GATEWAY_SETTINGS, "database_url": database_url, "metrics_port": free_port(), **overrides}
        gateway = await make_gateway(env, **settings)
        return LedgerGateway(gateway, gateway.running.application.control.ledger, database_url)

    return make


@dataclass
class Expected:
    """What the calls themselves said they came to (from their responses)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cost_nano_usd: int = 0
    saved_cost_nano_usd: int = 0
    errors: int = 0
    cache_hits: int = 0
    codes: list[str] = field(default_factory=list)

    def answered(self, usage: pb.Usage, cost: pb.Cost, hit: bool) -> None:
        self.requests += 1
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cached_input_tokens += usage.cached_input_tokens
        if hit:
            self.cache_hits += 1
            self.saved_cost_nano_usd += usd_to_nano(cost.total_usd)
        else:
            self.cost_nano_usd += usd_to_nano(cost.total_usd)
        self.codes.append("OK")

    def failed(self, error: grpc.aio.AioRpcError) -> None:
        self.requests += 1
        self.errors += 1
        self.codes.append(error.code().name)

    def matches(self, row: UsageRow) -> None:
        got = (
            row.requests,
            row.input_tokens,
            row.output_tokens,
            row.cached_input_tokens,
            row.cost_nano_usd,
            row.saved_cost_nano_usd,
            row.errors,
            row.cache_hits,
        )
        want = (
            self.requests,
            self.input_tokens,
            self.output_tokens,
            self.cached_input_tokens,
            self.cost_nano_usd,
            self.saved_cost_nano_usd,
            self.errors,
            self.cache_hits,
        )
        assert got == want


async def run_calls(stub: pb_grpc.LLMGatewayServiceStub, tag: str, expected: Expected) -> None:
    """One round of every kind of call the ledger records (and some it does not), noting in
    `expected` what each call's response said."""
    a, r = bearer(KEY_A), bearer(KEY_R)

    async def unary(call: Any, request: Any, metadata: Any) -> None:
        try:
            response = await call(request, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            expected.failed(error)
        else:
            expected.answered(response.usage, response.cost, response.cache.hit)

    async def stream(request: pb.ChatStreamRequest, metadata: Any) -> None:
        try:
            messages = await collect(stub.ChatStream(request, metadata=metadata))
        except grpc.aio.AioRpcError as error:
            expected.failed(error)
        else:
            final = messages[-1].final
            expected.answered(final.usage, final.cost, final.cache.hit)

    await unary(stub.Chat, chat("gpt-4o-mini", f"{tag} one"), a)
    await unary(stub.Chat, chat("gpt-4o-mini", f"{tag} one"), a)  # cache hit
    await stream(chat_stream("gpt-4o-mini", f"{tag} two"), a)
    await stream(chat_stream("gpt-4o-mini", f"{tag} two"), a)  # replayed from the cache
    embed = pb.EmbedRequest(model="text-embedding-3-small", inputs=[f"{tag} a", f"{tag} bb"])
    await unary(stub.Embed, embed, a)
    await unary(stub.Embed, embed, a)  # cache hit
    bypass = pb.CacheOptions(mode=pb.CACHE_MODE_BYPASS)
    await unary(stub.Chat, chat("gpt-4o-mini", f"{tag} three", end_user_id="user-7", cache=bypass), a)
    await unary(stub.Chat, chat("ledger-fail", f"{tag} four"), a)  # upstream 500: UNAVAILABLE
    await stream(chat_stream("ledger-fail", f"{tag} five"), a)  # fails before any content
    await unary(stub.Chat, pb.ChatRequest(model="gpt-4o-mini"), a)  # refused by validation
    await unary(stub.Chat, chat("missing-model", f"{tag} six"), a)  # upstream 404
    for i in range(3):  # rpm 1: refused by the rate limit (at least twice)
        await unary(stub.Chat, chat("gpt-4o-mini", f"{tag} limited {i}"), r)
    # not recorded: refused by auth, and calls that cost nothing
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Chat(chat("gpt-4o-mini", "no key"), metadata=bearer("gw-not-a-key"))
    await stub.ListModels(pb.ListModelsRequest(), metadata=a)
    await stub.CountTokens(pb.CountTokensRequest(model="gpt-4o-mini", messages=[user("count me")]), metadata=a)


CALLS_PER_ROUND = 14


async def test_ledger_completeness(ledger_gateway: LedgerGatewayFactory, database_url: str) -> None:
    started = datetime.now(UTC)
    served = await ledger_gateway(database_url)
    expected = Expected()
    await run_calls(served.gateway.stub, "round", expected)
    assert expected.requests == CALLS_PER_ROUND
    assert expected.codes.count("RESOURCE_EXHAUSTED") >= 2 and expected.cache_hits == 3
    # shown in QueryUsage within a few seconds (flushed every 0.2 s here; every second by default)
    await eventually(lambda: served.writer.written == CALLS_PER_ROUND, timeout_s=5)
    expected.matches((await served.read())[0])
    spent = served.metric("llm_gateway_spend_usd_total", key="a1", team="") + served.metric(
        "llm_gateway_spend_usd_total", key="r1", team=""
    )
    assert spent == pytest.approx(expected.cost_nano_usd / 1e9)  # per-key spend: every call's cost
    await served.stop()
    assert served.writer.written == CALLS_PER_ROUND and served.writer.dropped == 0
    total, rows = await served.read()
    expected.matches(total)
    assert [row["status_code"] for row in rows] == expected.codes
    first, hit, stream, stream_hit, _, _, user_row, fail, fail_stream, invalid, missing = rows[:11]
    assert {row["key_id"] for row in rows} == {"a1", "r1"}
    assert all(started <= row["time"] <= datetime.now(UTC) for row in rows)
    assert all(row["latency_ms"] > 0 for row in rows)
    assert [row["method"] for row in rows[:6]] == ["Chat", "Chat", "ChatStream", "ChatStream", "Embed", "Embed"]
    assert (first["model"], first["provider"], first["deployment"]) == ("gpt-4o-mini", "openai", "openai/gpt-4o-mini")
    assert first["cost_nano_usd"] > 0 and first["attempts"] == 1 and first["ttft_ms"] is None
    assert (hit["cache_hit"], hit["cost_nano_usd"], hit["attempts"]) == (True, 0, 0)
    assert hit["saved_cost_nano_usd"] == first["cost_nano_usd"]
    assert (hit["input_tokens"], hit["output_tokens"]) == (first["input_tokens"], first["output_tokens"])
    assert stream["ttft_ms"] is not None and 0 < stream["ttft_ms"] <= stream["latency_ms"]
    assert stream_hit["cache_hit"] and stream_hit["saved_cost_nano_usd"] == stream["cost_nano_usd"] > 0
    assert user_row["end_user_id"] == "user-7" and first["end_user_id"] == ""
    assert (fail["status_code"], fail["reason"], fail["cost_nano_usd"]) == ("UNAVAILABLE", "PROVIDER_UNAVAILABLE", 0)
    assert (fail["model"], fail["deployment"], fail["attempts"]) == ("ledger-fail", "openai/status-500", 1)
    assert (fail_stream["method"], fail_stream["reason"]) == ("ChatStream", "PROVIDER_UNAVAILABLE")
    assert fail_stream["input_tokens"] == 0 and fail_stream["ttft_ms"] is None
    assert (invalid["status_code"], invalid["reason"], invalid["model"]) == (
        "INVALID_ARGUMENT",
        "INVALID_REQUEST",
        "gpt-4o-mini",
    )
    assert (invalid["provider"], invalid["attempts"], invalid["cost_nano_usd"]) == ("", 0, 0)
    assert missing["status_code"] == "NOT_FOUND"
    limited = [row for row in rows if row["reason"] == "RATE_LIMIT_EXCEEDED"]
    assert len(limited) >= 2 and all(row["key_id"] == "r1" and row["cost_nano_usd"] == 0 for row in limited)


async def test_ledger_completeness_with_postgres_down_for_5_s(
    ledger_gateway: LedgerGatewayFactory, throwaway_postgres: ThrowawayPostgres
) -> None:
    served = await ledger_gateway(throwaway_postgres.url)
    expected = Expected()
    await run_calls(served.gateway.stub, "before", expected)
    await asyncio.to_thread(throwaway_postgres.stop)
    down = time.monotonic()
    rounds = 0
    while time.monotonic() - down < 5.0:  # the calls go on (and answer) while the database is away
        await run_calls(served.gateway.stub, f"down {rounds}", expected)
        rounds += 1
        await asyncio.sleep(0.5)
    assert served.writer.buffered > 0 and served.metric("llm_gateway_ledger_flush_failures_total") > 0
    await asyncio.to_thread(throwaway_postgres.start)
    await run_calls(served.gateway.stub, "after", expected)
    assert expected.requests == CALLS_PER_ROUND * (rounds + 2)
    await eventually(lambda: served.writer.written == expected.requests, timeout_s=10)
    await served.stop()
    assert served.writer.dropped == 0
    total, rows = await served.read()
    expected.matches(total)
    assert [row["status_code"] for row in rows] == expected.codes  # in call order
    assert len({row["request_id"] for row in rows}) == len(rows)


async def test_a_stream_cut_after_content_records_what_was_spent(
    ledger_gateway: LedgerGatewayFactory, sqlite_url: str
) -> None:
    served = await ledger_gateway(sqlite_url)
    call = served.gateway.stub.ChatStream(chat_stream("ledger-cut", "cut me"), metadata=bearer(KEY_A))
    deltas = []
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for message in call:
            deltas.append(message.delta.text)
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE and deltas
    await served.stop()
    _, (row,) = await served.read()
    assert (row["status_code"], row["reason"], row["method"]) == ("UNAVAILABLE", "PROVIDER_UNAVAILABLE", "ChatStream")
    # the router's estimate of what the provider was paid for: the input and the output so far
    assert row["output_tokens"] == estimate_tokens(len("".join(deltas))) > 0
    assert row["input_tokens"] > 0 and row["ttft_ms"] is not None and row["attempts"] == 1
    cost = (
        row["input_tokens"] * PRICE["input_per_million_usd"] + row["output_tokens"] * PRICE["output_per_million_usd"]
    ) / 1e6
    assert row["cost_nano_usd"] == usd_to_nano(cost) > 0


async def test_cancelled_and_timed_out_calls_are_recorded(
    ledger_gateway: LedgerGatewayFactory, sqlite_url: str
) -> None:
    served = await ledger_gateway(sqlite_url)
    stub, a = served.gateway.stub, bearer(KEY_A)
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await stub.Chat(chat("ledger-hang", "wait"), metadata=a, timeout=0.5)
    assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    call = stub.ChatStream(chat_stream("ledger-stall", "stall"), metadata=a)
    first = await call.read()
    assert first.WhichOneof("event") == "delta"
    call.cancel()
    await eventually(lambda: served.writer.buffered + served.writer.written == 2)
    await served.stop()
    _, (timed_out, cancelled) = await served.read()
    assert (timed_out["method"], timed_out["status_code"], timed_out["deployment"]) == (
        "Chat",
        "DEADLINE_EXCEEDED",
        "openai/hang",
    )
    assert timed_out["latency_ms"] >= 400 and timed_out["cost_nano_usd"] == 0
    assert (cancelled["method"], cancelled["status_code"]) == ("ChatStream", "CANCELLED")
    # the stream was committed: its input and first delta were paid for
    assert cancelled["output_tokens"] == estimate_tokens(len(first.delta.text)) and cancelled["cost_nano_usd"] > 0


async def test_anonymous_calls_are_recorded_with_no_key(ledger_gateway: LedgerGatewayFactory, sqlite_url: str) -> None:
    served = await ledger_gateway(sqlite_url, auth={"keys": []})  # loopback-only mode: no keys
    response = await served.gateway.stub.Chat(chat("gpt-4o-mini", "anonymous"))
    await served.stop()
    _, (row,) = await served.read()
    assert (row["key_id"], row["team_id"], row["status_code"]) == ("", "", "OK")
    assert row["cost_nano_usd"] == usd_to_nano(response.cost.total_usd) > 0


ADMIN_KEY = "gw-ledger-admin-0123456789"


async def test_a_team_key_s_calls_are_its_team_s_spend(ledger_gateway: LedgerGatewayFactory, sqlite_url: str) -> None:
    # a minute between flushes: GetSpend must add what is not written yet
    served = await ledger_gateway(
        sqlite_url, auth={"keys": []}, admin_key=ADMIN_KEY, ledger={"flush_interval_s": 60}, cache={"enabled": False}
    )
    admin = apb_grpc.AdminServiceStub(served.gateway.channel)
    as_admin = bearer(ADMIN_KEY)
    await admin.CreateTeam(
        apb.CreateTeamRequest(team=apb.Team(display_name="Ledger"), team_id="ledger"), metadata=as_admin
    )
    created = await admin.CreateKey(
        apb.CreateKeyRequest(key=apb.Key(display_name="ledger key", team="teams/ledger"), key_id="lk"),
        metadata=as_admin,
    )
    answers = [
        await served.gateway.stub.Chat(chat("gpt-4o-mini", f"team {i}"), metadata=bearer(created.secret))
        for i in range(3)
    ]
    cost = sum(usd_to_nano(a.cost.total_usd) for a in answers)
    assert cost > 0 and served.writer.written == 0
    for name in ("keys/lk", "teams/ledger"):
        spend = await admin.GetSpend(apb.GetSpendRequest(name=name), metadata=as_admin)
        assert usd_to_nano(spend.spend_usd) == cost
    assert served.metric("llm_gateway_spend_usd_total", key="lk", team="ledger") == pytest.approx(cost / 1e9)
    await served.stop()
    total, rows = await served.read()
    assert [(row["key_id"], row["team_id"]) for row in rows] == [("lk", "ledger")] * 3
    assert total.cost_nano_usd == cost


async def test_sigterm_right_after_the_last_call_loses_no_record(
    openai_upstream: OpenAIEmulator, database_url: str, tmp_path: Path
) -> None:
    """The real CLI: the ledger flushes only every minute, so at SIGTERM every record still
    waits in memory; the drain writes them all before the process exits."""
    config = tmp_path / "gateway.yaml"
    settings = {**GATEWAY_SETTINGS, "database_url": database_url, "ledger": {"flush_interval_s": 60}}
    config.write_text(yaml.safe_dump(settings))
    port = free_port()
    env = {
        **os.environ,
        "OPENAI_API_KEY": OPENAI_TEST_KEY,
        "OPENAI_BASE_URL": openai_upstream.base_url,
        "LLM_GATEWAY_METRICS_PORT": "0",
        "LLM_GATEWAY_GRACE_PERIOD_S": "5",
    }
    log_path = tmp_path / "gateway.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(  # noqa: ASYNC220 - the real process and its signal handling are the point
            [sys.executable, "-m", "llm_gateway_server", "serve", "--port", str(port), "--config", str(config)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        expected = Expected()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT) as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = pb_grpc.LLMGatewayServiceStub(channel)
            await run_calls(stub, "sigterm", expected)
            last = await collect(stub.ChatStream(chat_stream("gpt-4o-mini", "the last one"), metadata=bearer(KEY_A)))
            process.send_signal(signal.SIGTERM)  # at once: the last record is not even submitted yet, maybe
            expected.answered(last[-1].final.usage, last[-1].final.cost, last[-1].final.cache.hit)
        assert await asyncio.to_thread(process.wait, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    closed = [line for line in lines if line["event"] == "ledger_closed"]
    assert closed and closed[0]["records_written"] == CALLS_PER_ROUND + 1 and closed[0]["records_dropped"] == 0
    total, rows = await read_ledger(database_url)
    expected.matches(total)
    assert [row["status_code"] for row in rows] == expected.codes
