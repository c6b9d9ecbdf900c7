"""The key cache (`tenancy/key_cache.py`) on a real store (a SQLite file and the machine's
PostgreSQL, each test in its own file or schema), and key events (`state/key_events.py`) on a real
`redis-server`.

Database outages are real: a loopback TCP proxy in front of PostgreSQL refuses connections or
swallows every byte (`tests/emulators/tcp_proxy.py`). Database calls are counted by a `Store`
subclass that forwards every call to the real store.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from llm_gateway_server.config import ApiKeySettings, KeyCacheSettings, StoreSettings
from llm_gateway_server.errors import GatewayError
from llm_gateway_server.state.key_events import CHANNEL, KeyEvents
from llm_gateway_server.store.base import ScopeKind, Store
from llm_gateway_server.store.sql import open_store, resolve_database_url
from llm_gateway_server.tenancy.key_cache import KeyCache, configured_key_record, hash_key
from llm_gateway_server.tenancy.records import (
    Budget,
    BudgetPeriod,
    KeyRecord,
    Limits,
    TeamRecord,
    UsageQuery,
    UsageRecord,
    UsageRow,
)

from .conftest import PostgresSchema, RedisServer, ThrowawayPostgres, free_port
from .emulators.tcp_proxy import TcpProxy

TIMEOUT_S = 1.0  # the key cache's bound on a lookup, seconds
STORE = StoreSettings(timeout_s=5.0)  # the store's own (the tests' direct calls, on a loaded machine)
SLACK_S = 0.5  # scheduling on a loaded machine (xdist)
SECRET = "gw-db-key-secret-0123456789abcdef"
OTHER_SECRET = "gw-db-key-secret-fedcba9876543210"
CONFIGURED_SECRET = "gw-configured-secret-abcdefabcdef"


class CountingStore(Store):
    """The real store, with every call counted by method name (`calls`)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    async def create_team(self, team: TeamRecord) -> TeamRecord:
        self.calls["create_team"] += 1
        return await self.inner.create_team(team)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        self.calls["get_team"] += 1
        return await self.inner.get_team(team_id)

    async def list_teams(self, after_id: str, limit: int) -> list[TeamRecord]:
        self.calls["list_teams"] += 1
        return await self.inner.list_teams(after_id, limit)

    async def update_team(self, team: TeamRecord) -> TeamRecord:
        self.calls["update_team"] += 1
        return await self.inner.update_team(team)

    async def delete_team(self, team_id: str) -> None:
        self.calls["delete_team"] += 1
        await self.inner.delete_team(team_id)

    async def create_key(self, key: KeyRecord) -> KeyRecord:
        self.calls["create_key"] += 1
        return await self.inner.create_key(key)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        self.calls["get_key"] += 1
        return await self.inner.get_key(key_id)

    async def find_key(self, secret_sha256: str) -> KeyRecord | None:
        self.calls["find_key"] += 1
        return await self.inner.find_key(secret_sha256)

    async def list_keys(self, team_id: str | None, after_id: str, limit: int, include_revoked: bool) -> list[KeyRecord]:
        self.calls["list_keys"] += 1
        return await self.inner.list_keys(team_id, after_id, limit, include_revoked)

    async def update_key(self, key: KeyRecord) -> KeyRecord:
        self.calls["update_key"] += 1
        return await self.inner.update_key(key)

    async def count_keys(self) -> int:
        self.calls["count_keys"] += 1
        return await self.inner.count_keys()

    async def write_usage(self, records: Sequence[UsageRecord]) -> None:
        self.calls["write_usage"] += 1
        await self.inner.write_usage(records)

    async def query_usage(self, query: UsageQuery) -> list[UsageRow]:
        self.calls["query_usage"] += 1
        return await self.inner.query_usage(query)

    async def spend(self, kind: ScopeKind, scope_id: str, since: datetime | None) -> int:
        self.calls["spend"] += 1
        return await self.inner.spend(kind, scope_id, since)

    async def ping(self) -> None:
        self.calls["ping"] += 1
        await self.inner.ping()

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- databases -------------------------------------------------------------------------------


def sql_url(url: str) -> str:
    """The SQLAlchemy URL `open_store` takes."""
    return resolve_database_url(url, Path("unused"))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """A migrated SQLite file of the test's own, then a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        return sql_url(request.getfixturevalue("migrated_sqlite_url"))
    schema: PostgresSchema = request.getfixturevalue("postgres_url")
    return sql_url(schema.url)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[CountingStore]:
    opened = await open_store(database_url, STORE)
    counting = CountingStore(opened)
    yield counting
    await opened.aclose()


@pytest.fixture
async def pg_proxy() -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def proxied_store(pg_proxy: TcpProxy, postgres_url: PostgresSchema) -> AsyncIterator[CountingStore]:
    """A store on the test's PostgreSQL schema through `pg_proxy` (which the test can cut)."""
    url = postgres_url.url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{pg_proxy.port}/")
    opened = await open_store(sql_url(url), STORE)
    counting = CountingStore(opened)
    yield counting
    await opened.aclose()


def settings(**fields: Any) -> KeyCacheSettings:
    return KeyCacheSettings(**{"ttl_s": 60.0, "stale_s": 60.0, "negative_ttl_s": 60.0, **fields})


@pytest.fixture
async def caches() -> AsyncIterator[list[KeyCache]]:
    """Key caches the test makes, closed afterwards."""
    made: list[KeyCache] = []
    yield made
    for cache in made:
        await cache.aclose()


def new_cache(
    made: list[KeyCache], store: Store | None, configured: Sequence[ApiKeySettings] = (), **fields: Any
) -> KeyCache:
    cache = KeyCache(store, configured, settings(**fields), timeout_s=TIMEOUT_S)
    made.append(cache)
    return cache


async def add_key(store: Store, key_id: str, secret: str, **fields: Any) -> KeyRecord:
    return await store.create_key(KeyRecord(id=key_id, display_name=key_id, secret_sha256=hash_key(secret), **fields))


async def refused(cache: KeyCache, secret: str) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        await cache.resolve(secret)
    return caught.value


# --- database keys ---------------------------------------------------------------------------


async def test_database_key_with_team_and_spend_seeds(store: CountingStore, caches: list[KeyCache]) -> None:
    now = datetime.now(UTC)
    team = TeamRecord(
        "research",
        "Research",
        allowed_models=("gpt-*",),
        budget=Budget(5_000_000_000, BudgetPeriod.DAILY),
    )
    await store.create_team(team)
    await add_key(
        store,
        "k1",
        SECRET,
        team_id="research",
        limits=Limits(rpm=7),
        budget=Budget(1_000_000_000, BudgetPeriod.MONTHLY),
        owner="acme",
    )
    await add_key(store, "k2", OTHER_SECRET, team_id="research")
    day_start, _ = Budget(1, BudgetPeriod.DAILY).bounds(now)
    month_start, _ = Budget(1, BudgetPeriod.MONTHLY).bounds(now)
    assert day_start is not None and month_start is not None
    records = [
        UsageRecord(time=now, request_id="r1", key_id="k1", team_id="research", cost_nano_usd=300),
        UsageRecord(time=now, request_id="r2", key_id="k2", team_id="research", cost_nano_usd=50),
        # before today but inside this month (unless today is the 1st): the key's seed only
        UsageRecord(
            time=day_start - timedelta(seconds=1), request_id="r3", key_id="k1", team_id="research", cost_nano_usd=7
        ),
        UsageRecord(
            time=month_start - timedelta(days=1), request_id="r4", key_id="k1", team_id="research", cost_nano_usd=1000
        ),
    ]
    await store.write_usage(records)
    cache = new_cache(caches, store)

    tenant = await cache.resolve(SECRET)

    assert (tenant.key.id, tenant.key.owner, tenant.key.limits.rpm) == ("k1", "acme", 7)
    assert tenant.team is not None and tenant.team.allowed_models == ("gpt-*",)
    assert tenant.key_spend is not None and tenant.key_spend.period_start == month_start
    in_month = 307 if day_start > month_start else 300
    assert tenant.key_spend.spend_nano_usd == in_month
    assert tenant.team_spend is not None and tenant.team_spend.period_start == day_start
    assert tenant.team_spend.spend_nano_usd == 350
    other = await cache.resolve(OTHER_SECRET)
    assert other.key_spend is None  # no key budget: no seed
    assert other.team_spend is not None and other.team_spend.spend_nano_usd == 350


async def test_ttl_expiry_picks_up_a_database_change(store: CountingStore, caches: list[KeyCache]) -> None:
    key = await add_key(store, "k1", SECRET)
    cache = new_cache(caches, store, ttl_s=0.4)
    await cache.resolve(SECRET)
    await store.update_key(replace(key, disabled=True))  # no invalidation: only the TTL tells

    assert (await cache.resolve(SECRET)).key.disabled is False  # cached
    await asyncio.sleep(0.45)
    error = await refused(cache, SECRET)
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "API_KEY_DISABLED")
    assert store.calls["find_key"] == 2


async def test_a_busy_key_is_reread_in_the_background(store: CountingStore, caches: list[KeyCache]) -> None:
    """Used after half its TTL, a key is re-read behind the call; the call itself does not wait."""
    key = await add_key(store, "k1", SECRET)
    cache = new_cache(caches, store, ttl_s=0.6)
    await cache.resolve(SECRET)
    await store.update_key(replace(key, limits=Limits(rpm=3)))
    await asyncio.sleep(0.35)
    assert (await cache.resolve(SECRET)).key.limits.rpm is None  # answered from the cache
    for _ in range(50):
        if store.calls["find_key"] == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert store.calls["find_key"] == 2
    assert (await cache.resolve(SECRET)).key.limits.rpm == 3
    assert store.calls["find_key"] == 2


async def test_unknown_secrets_are_cached_as_unknown(store: CountingStore, caches: list[KeyCache]) -> None:
    cache = new_cache(caches, store, negative_ttl_s=0.3)
    for _ in range(5):
        error = await refused(cache, SECRET)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")
    assert store.calls["find_key"] == 1
    await add_key(store, "k1", SECRET)  # created elsewhere: this cache was not told
    assert (await refused(cache, SECRET)).reason == "API_KEY_INVALID"
    await asyncio.sleep(0.35)
    assert (await cache.resolve(SECRET)).key.id == "k1"
    assert store.calls["find_key"] == 2


async def test_a_created_key_is_not_refused_as_unknown(store: CountingStore, caches: list[KeyCache]) -> None:
    cache = new_cache(caches, store)
    assert (await refused(cache, SECRET)).reason == "API_KEY_INVALID"
    await add_key(store, "k1", SECRET)
    cache.note_key_created()
    assert (await cache.resolve(SECRET)).key.id == "k1"


async def test_single_flight(store: CountingStore, caches: list[KeyCache]) -> None:
    await store.create_team(TeamRecord("t", "T", budget=Budget(10, BudgetPeriod.TOTAL)))
    await add_key(store, "k1", SECRET, team_id="t", budget=Budget(10, BudgetPeriod.DAILY))
    cache = new_cache(caches, store)

    tenants = await asyncio.gather(*(cache.resolve(SECRET) for _ in range(100)))
    assert {t.key.id for t in tenants} == {"k1"}
    assert store.calls == Counter({"create_team": 1, "create_key": 1, "find_key": 1, "get_team": 1, "spend": 2})

    errors = await asyncio.gather(*(cache.resolve(OTHER_SECRET) for _ in range(100)), return_exceptions=True)
    assert {e.reason for e in errors if isinstance(e, GatewayError)} == {"API_KEY_INVALID"}
    assert len(errors) == 100 and store.calls["find_key"] == 2


async def test_a_cancelled_caller_does_not_cancel_the_shared_lookup(
    store: CountingStore, caches: list[KeyCache]
) -> None:
    await add_key(store, "k1", SECRET)
    cache = new_cache(caches, store)
    first = asyncio.create_task(cache.resolve(SECRET))
    second = asyncio.create_task(cache.resolve(SECRET))
    await asyncio.sleep(0)
    first.cancel()
    assert (await second).key.id == "k1"
    assert store.calls["find_key"] == 1


async def test_rotation_grace_period(store: CountingStore, caches: list[KeyCache]) -> None:
    key = await add_key(store, "k1", SECRET)
    cache = new_cache(caches, store)
    await cache.resolve(SECRET)
    grace_end = datetime.now(UTC) + timedelta(seconds=1.5)
    await store.update_key(
        replace(
            key,
            secret_sha256=hash_key(OTHER_SECRET),
            previous_secret_sha256=key.secret_sha256,
            previous_secret_expire_time=grace_end,
        )
    )
    cache.invalidate("k1")

    assert (await cache.resolve(SECRET)).key.id == "k1"
    assert (await cache.resolve(OTHER_SECRET)).key.id == "k1"
    await asyncio.sleep(max(0.0, (grace_end - datetime.now(UTC)).total_seconds()) + 0.05)
    error = await refused(cache, SECRET)  # checked at resolve time: no database read needed
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")
    assert "rotation" in error.message and SECRET not in error.message
    assert (await cache.resolve(OTHER_SECRET)).key.id == "k1"


@pytest.mark.parametrize(
    ("fields", "code", "reason"),
    [
        ({"revoke_time": datetime(2024, 1, 1, tzinfo=UTC)}, grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED"),
        ({"disabled": True}, grpc.StatusCode.PERMISSION_DENIED, "API_KEY_DISABLED"),
        ({"expire_time": datetime(2024, 1, 1, tzinfo=UTC)}, grpc.StatusCode.UNAUTHENTICATED, "API_KEY_EXPIRED"),
        # revoked wins over disabled and expired
        (
            {
                "revoke_time": datetime(2024, 1, 1, tzinfo=UTC),
                "disabled": True,
                "expire_time": datetime(2020, 1, 1, tzinfo=UTC),
            },
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_REVOKED",
        ),
    ],
)
async def test_refused_keys(
    store: CountingStore, caches: list[KeyCache], fields: dict[str, Any], code: grpc.StatusCode, reason: str
) -> None:
    await add_key(store, "k1", SECRET, budget=Budget(10, BudgetPeriod.DAILY), **fields)
    cache = new_cache(caches, store)
    for _ in range(3):
        error = await refused(cache, SECRET)
        assert (error.code, error.reason, error.metadata["key_id"]) == (code, reason, "k1")
    assert store.calls["find_key"] == 1  # refused keys are cached too
    assert store.calls["spend"] == 0  # and need no spend seed


async def test_a_key_expires_while_cached(store: CountingStore, caches: list[KeyCache]) -> None:
    expire_time = datetime.now(UTC) + timedelta(seconds=1.0)
    await add_key(store, "k1", SECRET, expire_time=expire_time)
    cache = new_cache(caches, store)
    await cache.resolve(SECRET)
    await asyncio.sleep((expire_time - datetime.now(UTC)).total_seconds() + 0.05)
    assert (await refused(cache, SECRET)).reason == "API_KEY_EXPIRED"
    assert store.calls["find_key"] == 1


async def test_invalidate_drops_a_key_at_once(store: CountingStore, caches: list[KeyCache]) -> None:
    key = await add_key(store, "k1", SECRET)
    cache = new_cache(caches, store)
    await cache.resolve(SECRET)
    await store.update_key(replace(key, revoke_time=datetime.now(UTC)))
    cache.invalidate("k1")
    assert (await refused(cache, SECRET)).reason == "API_KEY_REVOKED"


async def test_team_invalidation_rereads_its_keys(store: CountingStore, caches: list[KeyCache]) -> None:
    team = await store.create_team(TeamRecord("t", "T"))
    await add_key(store, "k1", SECRET, team_id="t")
    await add_key(store, "k2", OTHER_SECRET)
    cache = new_cache(caches, store)
    await cache.resolve(SECRET)
    await cache.resolve(OTHER_SECRET)
    await store.update_team(replace(team, allowed_models=("gpt-*",)))
    cache.invalidate_team("t")
    tenant = await cache.resolve(SECRET)
    assert tenant.team is not None and tenant.team.allowed_models == ("gpt-*",)
    await cache.resolve(OTHER_SECRET)
    assert store.calls["find_key"] == 3  # k2 is not in the team: still cached


async def test_entries_are_bounded(store: CountingStore, caches: list[KeyCache]) -> None:
    secrets = [f"gw-bounded-secret-{i:02d}-0123456789" for i in range(3)]
    for i, secret in enumerate(secrets):
        await add_key(store, f"k{i}", secret)
    cache = new_cache(caches, store, max_entries=2)
    for secret in secrets:
        await cache.resolve(secret)
    await cache.resolve(secrets[2])
    await cache.resolve(secrets[1])
    assert store.calls["find_key"] == 3
    await cache.resolve(secrets[0])  # least recently used: dropped
    assert store.calls["find_key"] == 4
    # unknown secrets are dropped before known keys
    for i in range(5):
        await refused(cache, f"gw-unknown-{i}-abcdefabcdef")
    await cache.resolve(secrets[0])
    assert store.calls["find_key"] == 9


async def test_a_database_key_never_shadows_a_configured_one(store: CountingStore, caches: list[KeyCache]) -> None:
    configured = [ApiKeySettings(id="alpha", key_sha256=hash_key(CONFIGURED_SECRET))]
    await add_key(store, "alpha", SECRET)
    cache = new_cache(caches, store, configured)
    with capture_logs() as logs:
        error = await refused(cache, SECRET)
    assert error.reason == "API_KEY_INVALID"
    assert any(log["event"] == "key_shadows_configured_key" for log in logs)
    tenant = await cache.resolve(CONFIGURED_SECRET)
    assert tenant.key.configured and tenant.key.id == "alpha"
    cache.invalidate("alpha")  # configured keys are not affected
    assert (await cache.resolve(CONFIGURED_SECRET)).key.configured
    assert store.calls["find_key"] == 1


def test_configured_key_records() -> None:
    record = configured_key_record(
        ApiKeySettings(
            id="a",
            owner="team-a",
            key_sha256=hash_key(CONFIGURED_SECRET),
            allowed_models=["*"],
            rpm=5,
            budget={"limit_usd": 1.5, "period": "weekly"},  # type: ignore[arg-type]
            expires_at=datetime(2030, 1, 1, tzinfo=UTC),
        )
    )
    assert record.configured and record.allowed_models == () and record.tenant == "team-a"
    assert record.budget == Budget(1_500_000_000, BudgetPeriod.WEEKLY)
    assert record.limits == Limits(rpm=5) and record.expire_time == datetime(2030, 1, 1, tzinfo=UTC)
    narrow = configured_key_record(ApiKeySettings(id="b", key_sha256=hash_key(SECRET), allowed_models=["gpt-*", "m"]))
    assert narrow.allowed_models == ("gpt-*", "m") and narrow.budget is None and narrow.tenant == "b"
    with pytest.raises(ValueError, match="at least 1"):  # [] once meant "no model": now refused
        ApiKeySettings(id="c", key_sha256=hash_key(SECRET), allowed_models=[])


async def test_configured_key_spend_seed_comes_from_the_ledger(store: CountingStore, caches: list[KeyCache]) -> None:
    now = datetime.now(UTC)
    await store.write_usage(
        [UsageRecord(time=now, request_id=f"r{i}", key_id="alpha", cost_nano_usd=25) for i in range(4)]
    )
    configured = [
        ApiKeySettings(
            id="alpha",
            key_sha256=hash_key(CONFIGURED_SECRET),
            budget={"limit_usd": 1, "period": "daily"},  # type: ignore[arg-type]
        ),
        ApiKeySettings(id="plain", key_sha256=hash_key(OTHER_SECRET)),
    ]
    cache = new_cache(caches, store, configured)
    await cache.start()  # prefetches in the background
    tenant = await cache.resolve(CONFIGURED_SECRET)
    assert tenant.key_spend is not None and tenant.key_spend.spend_nano_usd == 100
    assert tenant.key_spend.period_start == Budget(1, BudgetPeriod.DAILY).bounds(now)[0]
    assert (await cache.resolve(OTHER_SECRET)).key_spend is None
    for _ in range(10):
        await cache.resolve(CONFIGURED_SECRET)
    assert store.calls["spend"] == 1 and store.calls["find_key"] == 0


# --- the database unreachable ----------------------------------------------------------------


async def test_configured_keys_work_without_a_database(caches: list[KeyCache]) -> None:
    dead = await open_store(sql_url(f"postgresql://postgres@127.0.0.1:{free_port()}/test"), STORE, migrate=False)
    try:
        configured = [
            ApiKeySettings(id="alpha", key_sha256=hash_key(CONFIGURED_SECRET), budget={"limit_usd": 1}),  # type: ignore[arg-type]
            ApiKeySettings(id="off", key_sha256=hash_key(OTHER_SECRET), disabled=True),
        ]
        cache = new_cache(caches, dead, configured)
        await cache.start()
        assert await cache.keys_exist()
        started = time.monotonic()
        with capture_logs() as logs:
            tenant = await cache.resolve(CONFIGURED_SECRET)
        assert tenant.key.id == "alpha"
        assert tenant.key_spend is not None and tenant.key_spend.spend_nano_usd == 0  # seeded 0, with a warning
        assert any(log["event"] == "key_spend_seed_unavailable" for log in logs)
        assert (await refused(cache, OTHER_SECRET)).reason == "API_KEY_DISABLED"
        error = await refused(cache, SECRET)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "KEY_STORE_UNAVAILABLE")
        assert error.retry_after_s is not None
        assert time.monotonic() - started < TIMEOUT_S + SLACK_S
        for _ in range(20):  # the database is known down: nobody waits on it
            assert (await cache.resolve(CONFIGURED_SECRET)).key.id == "alpha"
    finally:
        await dead.aclose()


async def test_no_store_at_all(caches: list[KeyCache]) -> None:
    cache = new_cache(caches, None)
    assert not await cache.keys_exist()
    assert (await refused(cache, SECRET)).reason == "API_KEY_INVALID"
    with_key = new_cache(caches, None, [ApiKeySettings(id="a", key_sha256=hash_key(SECRET))])
    assert await with_key.keys_exist() and (await with_key.resolve(SECRET)).key.id == "a"


async def test_stale_keys_serve_while_the_database_is_down(
    proxied_store: CountingStore, pg_proxy: TcpProxy, caches: list[KeyCache]
) -> None:
    await add_key(proxied_store, "k1", SECRET)
    cache = new_cache(caches, proxied_store, ttl_s=0.3, stale_s=1.0)
    await cache.resolve(SECRET)
    await pg_proxy.refuse()
    await asyncio.sleep(0.35)  # past the TTL

    started = time.monotonic()
    assert (await cache.resolve(SECRET)).key.id == "k1"  # stale, after one failed read
    for _ in range(20):
        assert (await cache.resolve(SECRET)).key.id == "k1"
    assert time.monotonic() - started < TIMEOUT_S + SLACK_S
    error = await refused(cache, OTHER_SECRET)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "KEY_STORE_UNAVAILABLE")
    assert SECRET not in error.message and OTHER_SECRET not in error.message
    assert time.monotonic() - started < TIMEOUT_S + SLACK_S

    await asyncio.sleep(1.0)  # past TTL + stale period
    error = await refused(cache, SECRET)
    assert error.reason == "KEY_STORE_UNAVAILABLE"

    await pg_proxy.restore()
    await asyncio.sleep(1.1)  # the next probe is due
    assert (await cache.resolve(SECRET)).key.id == "k1"


async def test_a_stopped_postgresql_server(throwaway_postgres: ThrowawayPostgres, caches: list[KeyCache]) -> None:
    """The database server really stops (and starts again): cached keys keep working, unknown
    ones are UNAVAILABLE within the timeout, and after the restart the cache reads again."""
    opened = await open_store(sql_url(throwaway_postgres.url), STORE)
    try:
        store = CountingStore(opened)
        await add_key(store, "k1", SECRET)
        cache = new_cache(caches, store, ttl_s=0.2, stale_s=60.0)
        await cache.resolve(SECRET)
        await asyncio.to_thread(throwaway_postgres.stop)
        await asyncio.sleep(0.25)

        started = time.monotonic()
        assert (await cache.resolve(SECRET)).key.id == "k1"
        error = await refused(cache, OTHER_SECRET)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "KEY_STORE_UNAVAILABLE")
        assert time.monotonic() - started < TIMEOUT_S + SLACK_S

        await asyncio.to_thread(throwaway_postgres.start)
        await add_key(store, "k2", OTHER_SECRET)
        await asyncio.sleep(1.05)  # the next probe is due
        assert (await cache.resolve(OTHER_SECRET)).key.id == "k2"
    finally:
        await opened.aclose()


async def test_a_blackholed_database_costs_at_most_the_timeout(
    proxied_store: CountingStore, pg_proxy: TcpProxy, caches: list[KeyCache]
) -> None:
    """A database that accepts connections but never answers (a partition): every call is
    answered within the timeout, concurrent ones too, and then without waiting at all."""
    await add_key(proxied_store, "k1", SECRET)
    cache = new_cache(caches, proxied_store, ttl_s=0.2, stale_s=30.0)
    await cache.resolve(SECRET)
    pg_proxy.blackhole()
    await asyncio.sleep(0.25)

    started = time.monotonic()
    results = await asyncio.gather(
        *(cache.resolve(SECRET) for _ in range(20)),
        *(cache.resolve(f"{OTHER_SECRET}-{i}") for i in range(20)),
        return_exceptions=True,
    )
    elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT_S + SLACK_S, elapsed
    assert all(not isinstance(r, BaseException) and r.key.id == "k1" for r in results[:20])
    assert {r.reason for r in results[20:] if isinstance(r, GatewayError)} == {"KEY_STORE_UNAVAILABLE"}

    started = time.monotonic()
    assert (await cache.resolve(SECRET)).key.id == "k1"
    assert (await refused(cache, OTHER_SECRET)).reason == "KEY_STORE_UNAVAILABLE"
    assert time.monotonic() - started < 0.05  # known down: no waiting
    await pg_proxy.restore()


async def test_a_revocation_wins_over_stale_serving(
    proxied_store: CountingStore, pg_proxy: TcpProxy, caches: list[KeyCache]
) -> None:
    """Told a key changed, the cache drops it at once: with the database down it is then
    UNAVAILABLE, never served stale. `invalidate(None)` (messages maybe missed) re-reads too, but
    serves stale while the database is down."""
    await add_key(proxied_store, "k1", SECRET)
    await add_key(proxied_store, "k2", OTHER_SECRET)
    cache = new_cache(caches, proxied_store)
    await cache.resolve(SECRET)
    await cache.resolve(OTHER_SECRET)
    await pg_proxy.refuse()
    cache.invalidate(None)
    assert (await cache.resolve(SECRET)).key.id == "k1"  # re-read failed: stale
    cache.invalidate("k2")
    assert (await refused(cache, OTHER_SECRET)).reason == "KEY_STORE_UNAVAILABLE"
    await pg_proxy.restore()


async def test_keys_exist(store: CountingStore, caches: list[KeyCache]) -> None:
    cache = new_cache(caches, store, ttl_s=0.3)
    assert not await cache.keys_exist()
    assert not await cache.keys_exist()
    assert store.calls["count_keys"] == 1
    key = await add_key(store, "k1", SECRET)
    cache.note_key_created()
    assert await cache.keys_exist()
    assert store.calls["count_keys"] == 1
    other = new_cache(caches, store, ttl_s=0.3)  # another replica, not told
    assert await other.keys_exist()
    await store.update_key(replace(key, revoke_time=datetime.now(UTC)))
    other.invalidate("k1")  # re-read: a revoked key still counts, auth never turns off again
    reads = store.calls["count_keys"]
    await asyncio.sleep(0.4)
    assert await other.keys_exist()
    assert await other.keys_exist()
    await asyncio.sleep(0.05)
    assert store.calls["count_keys"] > reads, "the count was read again after the revocation"


async def test_keys_exist_while_an_invalidation_races_the_first_read(
    store: CountingStore, caches: list[KeyCache]
) -> None:
    """Found through the server: key events subscribe right after start and invalidate
    everything while `start`'s first count is in flight; that read's answer (no keys) must still
    be the answer, not "unknown, so keys exist" (which refused every anonymous call)."""
    cache = new_cache(caches, store)
    await cache.start()
    await asyncio.sleep(0)  # the first count is now reading
    cache.invalidate(None)
    assert not await cache.keys_exist()
    assert not await cache.keys_exist()


async def test_keys_exist_with_the_database_down(
    proxied_store: CountingStore, pg_proxy: TcpProxy, caches: list[KeyCache]
) -> None:
    await pg_proxy.refuse()
    never_read = new_cache(caches, proxied_store)
    assert await never_read.keys_exist()  # unknown: auth applies
    await pg_proxy.restore()
    known = new_cache(caches, proxied_store, ttl_s=0.2)
    assert not await known.keys_exist()
    await pg_proxy.refuse()
    await asyncio.sleep(0.25)
    assert not await known.keys_exist()  # the last answer


async def test_no_secret_in_logs_or_errors(
    proxied_store: CountingStore, pg_proxy: TcpProxy, caches: list[KeyCache]
) -> None:
    await add_key(proxied_store, "k1", SECRET, disabled=True)
    cache = new_cache(caches, proxied_store, ttl_s=0.1, stale_s=0.1, negative_ttl_s=0.0)
    messages: list[str] = []
    with capture_logs() as logs:
        for secret in (SECRET, OTHER_SECRET, "gw-never-seen-secret-00000"):
            messages.append((await refused(cache, secret)).message)
        await pg_proxy.refuse()
        await asyncio.sleep(0.25)
        for secret in (SECRET, OTHER_SECRET):
            messages.append((await refused(cache, secret)).message)
        await pg_proxy.restore()
    text = repr(logs) + repr(messages)
    assert any(log["event"] == "key_store_unavailable" for log in logs)
    for secret in (SECRET, OTHER_SECRET, "gw-never-seen-secret-00000"):
        assert secret not in text and hash_key(secret) not in text


# --- key events on Redis ---------------------------------------------------------------------


@pytest.fixture
async def events() -> AsyncIterator[list[KeyEvents]]:
    made: list[KeyEvents] = []
    yield made
    for item in made:
        await item.aclose()


async def new_events(made: list[KeyEvents], cache: KeyCache, url: str | None, **fields: Any) -> KeyEvents:
    item = KeyEvents(cache, url, timeout_s=0.25, **fields)
    made.append(item)
    await item.start()
    return item


async def test_a_revocation_reaches_another_replica_within_a_second(
    database_url: str, redis_server: RedisServer, caches: list[KeyCache], events: list[KeyEvents]
) -> None:
    """Replicas A and B: each its own store on the same database, its own cache (TTL 60 s) and
    key events on one Redis. A key revoked through A is refused by B well within 1 s."""
    store_a = await open_store(database_url, STORE)
    store_b = await open_store(database_url, STORE)
    try:
        key = await add_key(store_a, "k1", SECRET)
        cache_a, cache_b = new_cache(caches, store_a), new_cache(caches, store_b)
        events_a = await new_events(events, cache_a, redis_server.url)
        events_b = await new_events(events, cache_b, redis_server.url)
        assert await events_a.wait_subscribed(5) and await events_b.wait_subscribed(5)
        assert (await cache_a.resolve(SECRET)).key.id == "k1"
        assert (await cache_b.resolve(SECRET)).key.id == "k1"

        revoked_at = time.monotonic()
        await store_a.update_key(replace(key, revoke_time=datetime.now(UTC)))
        assert await events_a.key_changed("k1")
        assert (await refused(cache_a, SECRET)).reason == "API_KEY_REVOKED"
        while True:
            try:
                await cache_b.resolve(SECRET)
            except GatewayError as error:
                assert error.reason == "API_KEY_REVOKED"
                break
            assert time.monotonic() - revoked_at < 1.0, "B still accepts the revoked key"
            await asyncio.sleep(0.005)
        assert time.monotonic() - revoked_at < 1.0
    finally:
        await store_a.aclose()
        await store_b.aclose()


async def test_created_keys_and_team_changes_reach_other_replicas(
    store: CountingStore, redis_server: RedisServer, caches: list[KeyCache], events: list[KeyEvents]
) -> None:
    cache_a, cache_b = new_cache(caches, store), new_cache(caches, store)
    events_a = await new_events(events, cache_a, redis_server.url)
    events_b = await new_events(events, cache_b, redis_server.url)
    assert await events_a.wait_subscribed(5) and await events_b.wait_subscribed(5)
    assert not await cache_b.keys_exist()
    assert (await refused(cache_b, SECRET)).reason == "API_KEY_INVALID"  # now cached as unknown

    team = await store.create_team(TeamRecord("t", "T"))
    await add_key(store, "k1", SECRET, team_id="t")
    assert await events_a.key_created("k1")
    assert await cache_a.keys_exist()
    await eventually(cache_b.keys_exist)
    assert (await cache_b.resolve(SECRET)).key.id == "k1"

    await store.update_team(replace(team, allowed_models=("m",)))
    assert await events_a.team_changed("t")

    async def team_seen() -> bool:
        tenant = await cache_b.resolve(SECRET)
        return tenant.team is not None and tenant.team.allowed_models == ("m",)

    await eventually(team_seen)


async def eventually(check: Any, within_s: float = 1.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, f"not within {within_s}s"
        await asyncio.sleep(0.01)


def restart_redis(port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary is not None
    return subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_a_reconnect_rereads_everything(
    store: CountingStore, redis_server: RedisServer, caches: list[KeyCache], events: list[KeyEvents]
) -> None:
    """Redis goes away: messages published meanwhile are lost, so on reconnecting the listener
    has every cached key re-read (before its TTL of 60 s)."""
    key = await add_key(store, "k1", SECRET)
    cache = new_cache(caches, store)
    listener = await new_events(events, cache, redis_server.url, max_backoff_s=0.2)
    assert await listener.wait_subscribed(5)
    await cache.resolve(SECRET)

    redis_server.kill()
    await eventually(lambda: asyncio.sleep(0, not listener.subscribed), within_s=2.0)
    publisher = await new_events(events, new_cache(caches, store), redis_server.url)
    started = time.monotonic()
    assert not await publisher.key_changed("k1")  # Redis is down: not published, and quickly
    assert time.monotonic() - started < 1.0
    await store.update_key(replace(key, disabled=True))
    assert (await cache.resolve(SECRET)).key.disabled is False  # this replica was not told

    replacement = restart_redis(redis_server.port)
    try:
        assert await listener.wait_subscribed(5)
        assert (await refused(cache, SECRET)).reason == "API_KEY_DISABLED"
    finally:
        replacement.kill()
        replacement.wait(timeout=10)


async def test_a_frozen_redis_is_detected_and_left(
    store: CountingStore, redis_server: RedisServer, caches: list[KeyCache], events: list[KeyEvents]
) -> None:
    """Redis stops answering without closing the connection (SIGSTOP): PINGs go unanswered, the
    listener gives the connection up, and subscribes again once Redis answers."""
    cache = new_cache(caches, store)
    listener = await new_events(events, cache, redis_server.url, ping_interval_s=0.2, dead_after_s=0.3)
    assert await listener.wait_subscribed(5)
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        await eventually(lambda: asyncio.sleep(0, not listener.subscribed), within_s=3.0)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert await listener.wait_subscribed(10)


async def test_unreadable_messages_reread_everything(
    store: CountingStore, redis_server: RedisServer, caches: list[KeyCache], events: list[KeyEvents]
) -> None:
    import redis.asyncio as redis

    key = await add_key(store, "k1", SECRET)
    cache = new_cache(caches, store)
    listener = await new_events(events, cache, redis_server.url)
    assert await listener.wait_subscribed(5)
    await cache.resolve(SECRET)
    await store.update_key(replace(key, disabled=True))
    client = redis.Redis.from_url(redis_server.url)
    try:
        await client.publish(CHANNEL, b"\xff not json")
    finally:
        await client.aclose()

    async def disabled_seen() -> bool:
        try:
            await cache.resolve(SECRET)
        except GatewayError as error:
            return error.reason == "API_KEY_DISABLED"
        return False

    await eventually(disabled_seen)


async def test_key_events_without_redis_apply_locally(store: CountingStore, caches: list[KeyCache]) -> None:
    key = await add_key(store, "k1", SECRET)
    cache = new_cache(caches, store)
    local = KeyEvents(cache, None)
    await local.start()
    await cache.resolve(SECRET)
    await store.update_key(replace(key, disabled=True))
    assert not await local.key_changed("k1")
    assert (await refused(cache, SECRET)).reason == "API_KEY_DISABLED"
    assert not local.subscribed and not await local.wait_subscribed(0.01)
    await local.aclose()
