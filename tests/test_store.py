"""The control plane's store (`store/sql.py`) on a real SQLite file and on the machine's real
PostgreSQL (a fresh schema per test), plus a throwaway PostgreSQL server taken away mid-run.

Every behaviour test runs on both databases (the `store` fixture is parametrized); grouping and
ordering are checked against the same sums computed in Python over the records written.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from llm_gateway_server.config import StoreSettings, load_settings
from llm_gateway_server.store.base import (
    AlreadyExistsError,
    NotFoundError,
    StoreError,
    StoreUnavailableError,
    TeamNotEmptyError,
)
from llm_gateway_server.store.migrations import HEAD_REVISION, MIGRATIONS_DIR
from llm_gateway_server.store.models import metadata
from llm_gateway_server.store.sql import (
    SqlStore,
    _server_options,
    open_store,
    resolve_database_url,
    safe_url,
    upgrade,
)
from llm_gateway_server.tenancy.records import (
    MAX_NANO_USD,
    Budget,
    BudgetPeriod,
    KeyRecord,
    Limits,
    TeamRecord,
    UsageGroupBy,
    UsageQuery,
    UsageRecord,
    UsageRow,
)

from .conftest import MACHINE_POSTGRES, PostgresSchema, ThrowawayPostgres, copy_sqlite_template, free_port

SETTINGS = StoreSettings(timeout_s=5.0, pool_size=3)


def digest(n: int) -> str:
    """A distinct well-formed SHA-256 hex digest."""
    return f"{n:064x}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A resolved URL of an empty database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return resolve_database_url(f"sqlite:///{tmp_path / 'gateway.db'}", tmp_path)
    schema: PostgresSchema = request.getfixturevalue("postgres_url")
    return resolve_database_url(schema.url, tmp_path)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlStore]:
    opened = await open_store(database_url, SETTINGS)
    yield opened
    await opened.aclose()


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)


# --- URLs ------------------------------------------------------------------------------------------


def test_resolve_database_url(tmp_path: Path) -> None:
    data_dir = tmp_path / "deep" / "data"
    url = resolve_database_url(None, data_dir)
    assert url == f"sqlite+aiosqlite:///{data_dir.resolve()}/gateway.db"
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert (data_dir / "gateway.db").stat().st_mode & 0o777 == 0o600

    assert resolve_database_url("postgresql://u:p@h:5/db", tmp_path) == "postgresql+asyncpg://u:p@h:5/db"
    assert resolve_database_url("postgres://u@h/db", tmp_path) == "postgresql+asyncpg://u@h/db"
    assert resolve_database_url("postgresql+asyncpg://u@h/db", tmp_path) == "postgresql+asyncpg://u@h/db"
    schema_url = "postgresql://u@h/db?options=-csearch_path%3Dt_1&application_name=t_1"
    resolved = resolve_database_url(schema_url, tmp_path)
    assert resolved.startswith("postgresql+asyncpg://u@h/db?")
    assert "options=-csearch_path%3Dt_1" in resolved and "application_name=t_1" in resolved

    file = tmp_path / "elsewhere" / "my.db"
    assert resolve_database_url(f"sqlite:///{file}", tmp_path) == f"sqlite+aiosqlite:///{file}"
    assert file.parent.is_dir()

    for bad in ("mysql://root:hunter2@h/db", "postgresql+psycopg2://root:hunter2@h/db", "not a url"):
        with pytest.raises(ValueError) as caught:
            resolve_database_url(bad, tmp_path)
        assert "hunter2" not in str(caught.value)


def test_safe_url_hides_passwords() -> None:
    shown = safe_url("postgresql+asyncpg://user:hunter2@db:5432/x?password=hunter3")
    assert "hunter2" not in shown and "hunter3" not in shown
    assert shown.startswith("postgresql+asyncpg://user:***@db:5432/x")


def test_server_options_parsing() -> None:
    assert _server_options("") == {}
    assert _server_options("-csearch_path=a") == {"search_path": "a"}
    assert _server_options("-c search_path=a,b -cstatement_timeout=5000 --lock-timeout=1s") == {
        "search_path": "a,b",
        "statement_timeout": "5000",
        "lock_timeout": "1s",
    }
    assert _server_options(r"-c application_name=with\ space") == {"application_name": "with space"}
    for bad in ("-x", "-c novalue", "search_path=a"):
        with pytest.raises(ValueError):
            _server_options(bad)


# --- migrations ------------------------------------------------------------------------------------


def test_head_revision_is_alembic_head() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    assert ScriptDirectory.from_config(config).get_heads() == [HEAD_REVISION]


async def test_migrations_idempotent_and_match_models(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    first = await open_store(database_url, SETTINGS)
    assert await first.revision() == HEAD_REVISION
    await first.create_team(TeamRecord("t1", "Team one"))
    await first.aclose()
    second = await open_store(database_url, SETTINGS)  # already at head: nothing to do, data kept
    assert await second.revision() == HEAD_REVISION
    assert await second.get_team("t1") is not None
    assert await upgrade(database_url, SETTINGS) == HEAD_REVISION

    def differences(conn: Any) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))

    async with second.engine.connect() as conn:
        assert await conn.run_sync(differences) == []
    await second.aclose()


async def test_concurrent_starts_migrate_once(database_url: str) -> None:
    stores = await asyncio.gather(*(open_store(database_url, SETTINGS) for _ in range(4)))
    try:
        assert [await s.revision() for s in stores] == [HEAD_REVISION] * 4
        await stores[0].create_team(TeamRecord("t1", "Team one"))
        assert await stores[3].get_team("t1") is not None
    finally:
        for s in stores:
            await s.aclose()


def test_concurrent_processes_migrate_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    code = (
        "import asyncio, sys\n"
        "from llm_gateway_server.store.sql import upgrade\n"
        "print(asyncio.run(upgrade(sys.argv[1])))\n"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = [p.communicate(timeout=60) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], results
    assert [out.strip().splitlines()[-1] for out, _ in results] == [HEAD_REVISION] * 3


def test_fast_path_skips_alembic(tmp_path: Path, migrated_sqlite_template: Path) -> None:
    """A database already at head opens without importing Alembic (start-up cost)."""
    url = resolve_database_url(copy_sqlite_template(migrated_sqlite_template, tmp_path), tmp_path)
    code = (
        "import asyncio, sys\n"
        "from llm_gateway_server.config import StoreSettings\n"
        "from llm_gateway_server.store.sql import open_store\n"
        "async def main():\n"
        "    store = await open_store(sys.argv[1], StoreSettings())\n"
        "    print(await store.revision(), 'alembic' in sys.modules)\n"
        "    await store.aclose()\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == [HEAD_REVISION, "False"]


async def test_database_of_a_newer_gateway_is_refused(tmp_path: Path, migrated_sqlite_template: Path) -> None:
    path = tmp_path / "gateway.db"
    copy_sqlite_template(migrated_sqlite_template, tmp_path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    conn.close()
    with pytest.raises(StoreError, match="newer gateway"):
        await open_store(resolve_database_url(f"sqlite:///{path}", tmp_path), SETTINGS)


def test_db_upgrade_command(tmp_path: Path) -> None:
    """`llm-gateway db upgrade` (in a subprocess: it configures logging for the process)."""

    def db_upgrade(database_url: str) -> subprocess.CompletedProcess[str]:
        config = tmp_path / "gateway.yaml"
        config.write_text(f"database_url: {database_url}\n", encoding="utf-8")
        command = [sys.executable, "-m", "llm_gateway_server", "db", "upgrade", "--config", str(config)]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    done = db_upgrade(f"sqlite:///{tmp_path / 'cli.db'}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == (
        f"database sqlite+aiosqlite:///{tmp_path / 'cli.db'} at revision {HEAD_REVISION}"
    )
    refused = db_upgrade(f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/x")
    assert refused.returncode == 2
    assert refused.stderr.startswith("llm-gateway: cannot migrate the database: ")
    assert "hunter2" not in refused.stderr + refused.stdout


# --- PostgreSQL schemas ----------------------------------------------------------------------------


async def test_postgres_schema_url_from_settings(postgres_url: PostgresSchema, tmp_path: Path) -> None:
    """A gateway's Settings take the fixture's URL as is; tables and Alembic's version table land
    in that schema, and a second schema sees none of its data."""
    settings = load_settings(environ={"LLM_GATEWAY_DATABASE_URL": postgres_url.url, "HOME": str(tmp_path)})
    store = await open_store(resolve_database_url(settings.database_url, settings.data_dir), settings.store)
    try:
        await store.create_team(TeamRecord("t1", "Team one"))
        async with store.engine.connect() as conn:
            assert await conn.scalar(text("SELECT current_schema()")) == postgres_url.schema
    finally:
        await store.aclose()
    conn = await asyncpg.connect(MACHINE_POSTGRES)
    try:
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE table_name = ANY($1::text[])",
            ["alembic_version", "teams", "api_keys", "usage_records"],
        )
        mine = sorted(r["table_name"] for r in tables if r["table_schema"] == postgres_url.schema)
        assert mine == ["alembic_version", "api_keys", "teams", "usage_records"]
        assert not [r for r in tables if r["table_schema"] == "public"]
    finally:
        await conn.close()


async def test_postgres_schemas_are_isolated(postgres_url: PostgresSchema, tmp_path: Path) -> None:
    import uuid

    other = f"t_{uuid.uuid4().hex}"
    conn = await asyncpg.connect(MACHINE_POSTGRES)
    await conn.execute(f'CREATE SCHEMA "{other}"')
    try:
        a = await open_store(resolve_database_url(postgres_url.url, tmp_path), SETTINGS)
        b = await open_store(
            resolve_database_url(f"{MACHINE_POSTGRES}?options=-csearch_path%3D{other}", tmp_path), SETTINGS
        )
        try:
            await a.create_team(TeamRecord("t1", "Team one"))
            await b.create_team(TeamRecord("t1", "Team one"))  # same id and name: another schema
            await a.write_usage([UsageRecord(datetime.now(UTC), "r1", key_id="k", cost_nano_usd=5)])
            assert await a.spend("key", "k", None) == 5
            assert await b.spend("key", "k", None) == 0
        finally:
            await a.aclose()
            await b.aclose()
    finally:
        await conn.execute(f'DROP SCHEMA "{other}" CASCADE')
        await conn.close()


# --- teams -----------------------------------------------------------------------------------------


async def test_team_crud(store: SqlStore) -> None:
    team = TeamRecord(
        "team-a",
        "Team A",
        allowed_models=("gpt-4o*", "claude-*"),
        limits=Limits(rpm=60, tpm=100_000, max_concurrent_streams=3),
        budget=Budget(5 * 10**9, BudgetPeriod.MONTHLY),
    )
    created = await store.create_team(team)
    assert_utc(created.create_time)
    assert created.update_time == created.create_time
    assert await store.get_team("team-a") == created
    assert await store.get_team("nope") is None

    with pytest.raises(AlreadyExistsError) as dup_id:
        await store.create_team(TeamRecord("team-a", "Other name"))
    assert (dup_id.value.field, dup_id.value.value) == ("id", "team-a")
    with pytest.raises(AlreadyExistsError) as dup_name:
        await store.create_team(TeamRecord("team-b", "Team A"))
    assert (dup_name.value.field, dup_name.value.value) == ("display_name", "Team A")

    updated = await store.update_team(replace(team, display_name="Team A2", allowed_models=(), budget=None))
    assert updated.display_name == "Team A2"
    assert updated.allowed_models == () and updated.budget is None
    assert updated.limits == team.limits
    assert updated.create_time == created.create_time
    assert_utc(updated.update_time)
    assert updated.update_time is not None and created.update_time is not None
    assert updated.update_time >= created.update_time
    assert await store.get_team("team-a") == updated

    await store.create_team(TeamRecord("team-b", "Team B"))
    with pytest.raises(AlreadyExistsError) as taken:
        await store.update_team(TeamRecord("team-b", "Team A2"))
    assert taken.value.field == "display_name"
    with pytest.raises(NotFoundError):
        await store.update_team(TeamRecord("missing", "X"))

    await store.delete_team("team-b")
    assert await store.get_team("team-b") is None
    with pytest.raises(NotFoundError):
        await store.delete_team("team-b")


async def test_list_teams_pagination(store: SqlStore) -> None:
    ids = [f"team-{n:02d}" for n in range(7)]
    for team_id in reversed(ids):
        await store.create_team(TeamRecord(team_id, f"name {team_id}"))
    pages: list[list[str]] = []
    after = ""
    while page := await store.list_teams(after, 3):
        pages.append([t.id for t in page])
        after = page[-1].id
    assert pages == [ids[0:3], ids[3:6], ids[6:7]]


# --- keys ------------------------------------------------------------------------------------------


def make_key(n: int, **fields: Any) -> KeyRecord:
    return KeyRecord(
        id=f"key-{n:02d}", display_name=f"Key {n}", secret_sha256=digest(n), secret_prefix=f"lgw_{n}", **fields
    )


async def test_key_crud(store: SqlStore) -> None:
    await store.create_team(TeamRecord("team-a", "Team A"))
    expire = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=5)))
    key = make_key(
        1,
        team_id="team-a",
        allowed_models=("gpt-*",),
        limits=Limits(rpm=10),
        budget=Budget(100, BudgetPeriod.DAILY),
        expire_time=expire,
        owner="tenant-1",
    )
    created = await store.create_key(key)
    got = await store.get_key("key-01")
    assert got == created
    assert got is not None
    assert got.expire_time == expire  # the same instant...
    assert_utc(got.expire_time)  # ...returned in UTC
    assert got.expire_time.hour == 2
    assert got.team_name == "teams/team-a" and got.tenant == "tenant-1"
    assert await store.get_key("nope") is None

    with pytest.raises(NotFoundError):
        await store.create_key(make_key(2, team_id="no-such-team"))
    for clash, field in (
        (replace(make_key(3), id="key-01"), "id"),
        (replace(make_key(3), display_name="Key 1"), "display_name"),
        (replace(make_key(3), secret_sha256=digest(1)), "secret"),
    ):
        with pytest.raises(AlreadyExistsError) as caught:
            await store.create_key(clash)
        assert caught.value.field == field
    assert await store.count_keys() == 1

    # Rotation: the new secret is current, the old one works as previous until its expiry.
    grace_end = datetime.now(UTC) + timedelta(hours=1)
    rotated = await store.update_key(
        replace(got, secret_sha256=digest(11), previous_secret_sha256=digest(1), previous_secret_expire_time=grace_end)
    )
    assert rotated.create_time == created.create_time
    assert rotated.previous_secret_expire_time == grace_end
    assert await store.find_key(digest(11)) == rotated
    assert await store.find_key(digest(1)) == rotated
    assert await store.find_key(digest(99)) is None
    assert await store.find_key("") is None

    # The current secret wins over another key's previous secret.
    other = await store.create_key(make_key(4))
    await store.update_key(replace(other, secret_sha256=digest(12), previous_secret_sha256=digest(11)))
    found = await store.find_key(digest(11))
    assert found is not None and found.id == "key-01"

    with pytest.raises(NotFoundError):
        await store.update_key(make_key(50))
    with pytest.raises(NotFoundError):
        await store.update_key(replace(rotated, team_id="no-such-team"))
    with pytest.raises(AlreadyExistsError) as name_taken:
        await store.update_key(replace(rotated, display_name="Key 4"))
    assert name_taken.value.field == "display_name"
    with pytest.raises(AlreadyExistsError) as secret_taken:
        await store.update_key(replace(rotated, secret_sha256=digest(12)))
    assert secret_taken.value.field == "secret"

    revoked = await store.update_key(replace(rotated, revoke_time=datetime.now(UTC), disabled=True))
    assert_utc(revoked.revoke_time)
    assert await store.count_keys() == 2  # revoked keys count: auth never turns off again
    assert await store.get_key("key-01") == revoked  # a revoked key still answers


async def test_list_keys_pagination_and_filters(store: SqlStore) -> None:
    await store.create_team(TeamRecord("team-a", "Team A"))
    for n in (5, 3, 1, 4, 2, 6):
        await store.create_key(make_key(n, team_id="team-a" if n % 2 else ""))
    revoked = await store.get_key("key-03")
    assert revoked is not None
    await store.update_key(replace(revoked, revoke_time=datetime.now(UTC)))

    async def all_pages(team: str | None, include_revoked: bool) -> list[list[str]]:
        pages, after = [], ""
        while page := await store.list_keys(team, after, 2, include_revoked):
            pages.append([k.id for k in page])
            after = page[-1].id
        return pages

    assert await all_pages(None, True) == [["key-01", "key-02"], ["key-03", "key-04"], ["key-05", "key-06"]]
    assert await all_pages(None, False) == [["key-01", "key-02"], ["key-04", "key-05"], ["key-06"]]
    assert await all_pages("team-a", True) == [["key-01", "key-03"], ["key-05"]]
    assert await all_pages("team-a", False) == [["key-01", "key-05"]]
    assert await all_pages("", True) == [["key-02", "key-04"], ["key-06"]]  # no team
    assert await store.count_keys() == 6  # the revoked one included


async def test_delete_team_refused_while_keys_belong_to_it(store: SqlStore) -> None:
    await store.create_team(TeamRecord("team-a", "Team A"))
    await store.create_key(make_key(1, team_id="team-a"))
    key = await store.create_key(make_key(2, team_id="team-a"))
    with pytest.raises(TeamNotEmptyError) as caught:
        await store.delete_team("team-a")
    assert caught.value.keys == 2
    first = await store.get_key("key-01")
    assert first is not None
    await store.update_key(replace(first, revoke_time=datetime.now(UTC)))
    await store.update_key(replace(key, team_id=""))  # moved out of the team
    await store.delete_team("team-a")  # only a revoked key was left: it stays, without a team
    kept = await store.get_key("key-01")
    assert kept is not None and kept.team_id == "" and kept.revoke_time is not None


async def test_field_bounds_are_checked(store: SqlStore) -> None:
    for bad in (
        TeamRecord("x" * 64, "name"),
        TeamRecord("t", "n" * 129),
        TeamRecord("t", "name", allowed_models=("m",) * 65),
        TeamRecord("t", "name", allowed_models=("m" * 257,)),
    ):
        with pytest.raises(ValueError):
            await store.create_team(bad)
    for bad_key in (
        replace(make_key(1), secret_prefix="p" * 33),
        replace(make_key(1), secret_sha256="ABC"),
        make_key(1, previous_secret_sha256="z" * 64),
    ):
        with pytest.raises(ValueError):
            await store.create_key(bad_key)
    assert await store.list_teams("", 10) == []
    assert await store.count_keys() == 0


# --- usage ledger ----------------------------------------------------------------------------------

T0 = datetime(2026, 3, 30, 22, 0, tzinfo=UTC)  # two UTC days: the 30th and the 31st


def ledger() -> list[UsageRecord]:
    """Records over 2 keys × 2 teams × 2 models × 2 providers × 2 UTC days, with errors and cache
    hits; times given in several time zones."""
    records = []
    zones = [UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=9, minutes=30))]
    for i in range(48):
        when = (T0 + timedelta(minutes=7 * i)).astimezone(zones[i % 3])
        records.append(
            UsageRecord(
                time=when,
                request_id=f"req-{i}",
                key_id=f"key-{i % 2}",
                team_id=f"team-{i % 4 // 2}",
                end_user_id="user-1",
                method="Chat" if i % 5 else "ChatStream",
                model=("gpt-4o", "llama3")[i % 3 % 2],
                provider=("openai", "ollama")[i % 4 % 3 % 2],
                deployment="d1",
                input_tokens=10 + i,
                output_tokens=2 * i,
                cached_input_tokens=i % 3,
                cache_write_tokens=i % 2,
                reasoning_tokens=i % 4,
                cost_nano_usd=0 if i % 6 == 0 else 100 + i,
                saved_cost_nano_usd=77 if i % 6 == 0 else 0,
                latency_ms=12.5 + i,
                ttft_ms=None if i % 2 else 3.25,
                status_code="OK" if i % 7 else "UNAVAILABLE",
                reason="" if i % 7 else "PROVIDER_UNAVAILABLE",
                cache_hit=i % 6 == 0,
                attempts=1 + i % 2,
            )
        )
    return records


_GROUP_FIELD = {
    UsageGroupBy.KEY: "key_id",
    UsageGroupBy.TEAM: "team_id",
    UsageGroupBy.MODEL: "model",
    UsageGroupBy.PROVIDER: "provider",
    UsageGroupBy.DAY: "day",
}


def expected_rows(records: list[UsageRecord], query: UsageQuery) -> list[UsageRow]:
    """`query` evaluated in Python (the reference for the SQL)."""
    fields = [_GROUP_FIELD[g] for g in dict.fromkeys(query.group_by)]
    groups: dict[tuple[str, ...], list[UsageRecord]] = defaultdict(list)
    for r in records:
        if any(value and getattr(r, name) != value for name, value in _filters(query)):
            continue
        if (query.start and r.time < query.start) or (query.end and r.time >= query.end):
            continue
        groups[tuple(getattr(r, f) for f in fields)].append(r)
    if not fields and not groups:
        groups[()] = []
    rows = []
    for values in sorted(groups):
        members = groups[values]
        rows.append(
            UsageRow(
                **dict(zip(fields, values, strict=True)),
                requests=len(members),
                input_tokens=sum(r.input_tokens for r in members),
                output_tokens=sum(r.output_tokens for r in members),
                cached_input_tokens=sum(r.cached_input_tokens for r in members),
                cache_write_tokens=sum(r.cache_write_tokens for r in members),
                reasoning_tokens=sum(r.reasoning_tokens for r in members),
                cost_nano_usd=sum(r.cost_nano_usd for r in members),
                saved_cost_nano_usd=sum(r.saved_cost_nano_usd for r in members),
                errors=sum(r.status_code != "OK" for r in members),
                cache_hits=sum(r.cache_hit for r in members),
            )
        )
    return rows[query.offset : query.offset + query.limit]


def _filters(query: UsageQuery) -> list[tuple[str, str]]:
    return [("key_id", query.key_id), ("team_id", query.team_id), ("model", query.model), ("provider", query.provider)]


async def test_query_usage_grouping_filters_and_ranges(store: SqlStore) -> None:
    records = ledger()
    await store.write_usage(records[:20])
    await store.write_usage(records[20:])
    G = UsageGroupBy  # noqa: N806 - short alias in a table of queries
    queries = [
        UsageQuery(),
        *(UsageQuery(group_by=(g,)) for g in G),
        UsageQuery(group_by=(G.MODEL, G.DAY)),
        UsageQuery(group_by=(G.DAY, G.MODEL)),
        UsageQuery(group_by=(G.KEY, G.TEAM, G.PROVIDER)),
        UsageQuery(group_by=tuple(G)),
        UsageQuery(group_by=(G.MODEL, G.MODEL)),  # a repeated group counts once
        UsageQuery(key_id="key-1", group_by=(G.MODEL,)),
        UsageQuery(team_id="team-0", provider="ollama"),
        UsageQuery(model="llama3", group_by=(G.DAY,)),
        UsageQuery(key_id="nobody"),
        UsageQuery(key_id="nobody", group_by=(G.DAY,)),
        UsageQuery(start=T0 + timedelta(hours=2), group_by=(G.DAY,)),
        UsageQuery(start=T0 + timedelta(minutes=70), end=T0 + timedelta(minutes=140)),  # [start, end)
        UsageQuery(end=T0.astimezone(timezone(timedelta(hours=3)))),  # nothing before T0
    ]
    for query in queries:
        assert await store.query_usage(query) == expected_rows(records, query), query
    day_rows = await store.query_usage(UsageQuery(group_by=(G.DAY,)))
    assert [r.day for r in day_rows] == ["2026-03-30", "2026-03-31"]
    assert sum(r.requests for r in day_rows) == 48

    # Pages of a grouped query concatenate to the whole result, in order.
    full = await store.query_usage(UsageQuery(group_by=tuple(G), limit=1000))
    assert len(full) > 5
    paged: list[UsageRow] = []
    while page := await store.query_usage(UsageQuery(group_by=tuple(G), limit=3, offset=len(paged))):
        paged.extend(page)
    assert paged == full
    assert await store.query_usage(UsageQuery(offset=1)) == []


async def test_spend_is_exact_in_nano_usd(store: SqlStore) -> None:
    t = datetime(2026, 1, 10, tzinfo=UTC)
    calls = [
        UsageRecord(t + timedelta(seconds=i), f"r{i}", key_id=f"k{i % 2}", team_id="team", cost_nano_usd=100)
        for i in range(2000)
    ]
    await store.write_usage(calls)
    for kind, scope, since, amount in (
        ("key", "k0", None, 100_000),
        ("key", "k1", None, 100_000),
        ("team", "team", None, 200_000),
        ("team", "team", t + timedelta(seconds=1000), 100_000),  # at or after `since`
        ("key", "k0", t + timedelta(seconds=1999), 0),
        ("key", "nobody", None, 0),
    ):
        spent = await store.spend(kind, scope, since)  # type: ignore[arg-type]
        assert type(spent) is int and spent == amount, (kind, scope, since)
    # Sums beyond 2^53 (where a double would round) stay exact, and so do usage sums.
    big = [UsageRecord(t, f"b{i}", key_id="big", cost_nano_usd=MAX_NANO_USD) for i in range(3)]
    await store.write_usage(big)
    assert await store.spend("key", "big", None) == 3 * MAX_NANO_USD
    (row,) = await store.query_usage(UsageQuery(key_id="big"))
    assert type(row.cost_nano_usd) is int and row.cost_nano_usd == 3 * MAX_NANO_USD


async def test_ledger_times_days_and_long_strings(store: SqlStore) -> None:
    # 23:30 at UTC-05:00 is 04:30 UTC the next day: the day is the UTC day.
    local = datetime(2026, 6, 1, 23, 30, 0, 654321, tzinfo=timezone(timedelta(hours=-5)))
    await store.write_usage(
        [UsageRecord(local, "r1", key_id="k", model="m" * 1000, end_user_id="u" * 1000, cost_nano_usd=1)]
    )
    (row,) = await store.query_usage(UsageQuery(key_id="k", group_by=(UsageGroupBy.DAY, UsageGroupBy.MODEL)))
    assert row.day == "2026-06-02"
    assert row.model == "m" * 256  # truncated to its column, not refused
    exact = local.astimezone(UTC)
    assert await store.spend("key", "k", exact) == 1
    assert await store.spend("key", "k", exact + timedelta(microseconds=1)) == 0
    assert await store.spend("key", "k", exact.replace(tzinfo=None)) == 1  # naive is taken as UTC
    await store.write_usage([])  # nothing to do


async def test_write_usage_is_all_or_none(store: SqlStore) -> None:
    good = UsageRecord(datetime.now(UTC), "ok", key_id="k", cost_nano_usd=1)
    bad = replace(good, request_id="bad", input_tokens=2**70)  # does not fit a BIGINT
    with pytest.raises(ValueError, match="does not fit"):
        await store.write_usage([good] * 10 + [bad])
    assert await store.query_usage(UsageQuery()) == [UsageRow()]


async def test_write_500_records(store: SqlStore) -> None:
    """500 records in one batch (timings are reported by the store notes, not asserted)."""
    now = datetime.now(UTC)
    batch = [UsageRecord(now, f"r{i}", key_id="k", model="gpt-4o", cost_nano_usd=100) for i in range(500)]
    await store.write_usage(batch)
    await store.write_usage(batch)
    (row,) = await store.query_usage(UsageQuery(key_id="k"))
    assert (row.requests, row.cost_nano_usd) == (1000, 100_000)


# --- unavailability --------------------------------------------------------------------------------


async def test_unreachable_postgres_fails_fast_without_password(tmp_path: Path) -> None:
    url = resolve_database_url(f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/test", tmp_path)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as caught:
        await open_store(url, StoreSettings(timeout_s=2.0))
    assert time.monotonic() - started < 2.0
    assert "hunter2" not in str(caught.value) and "***" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no driver traceback in logs
    lazy = await open_store(url, StoreSettings(timeout_s=2.0), migrate=False)  # does not connect
    with pytest.raises(StoreUnavailableError):
        await lazy.get_key("k")
    await lazy.aclose()


async def test_misconfigured_postgres(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailableError, match='InvalidCatalogNameError: database "no_such_db" does not exist'):
        await open_store(resolve_database_url("postgresql://postgres@127.0.0.1:5432/no_such_db", tmp_path), SETTINGS)
    missing_schema = f"{MACHINE_POSTGRES}?options=-csearch_path%3Dno_such_schema"
    with pytest.raises(StoreError, match="no schema has been selected"):
        await open_store(resolve_database_url(missing_schema, tmp_path), SETTINGS)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


async def test_silent_database_times_out(silent_server: int, tmp_path: Path) -> None:
    url = resolve_database_url(f"postgresql://postgres@127.0.0.1:{silent_server}/test", tmp_path)
    settings = StoreSettings(timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        await open_store(url, settings)
    assert time.monotonic() - started < 2.0
    store = await open_store(url, settings, migrate=False)
    for operation in (store.ping(), store.count_keys(), store.write_usage([UsageRecord(datetime.now(UTC), "r")])):
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await operation
        assert time.monotonic() - started < 2.0
    await store.aclose()


async def test_postgres_going_away_and_coming_back(throwaway_postgres: ThrowawayPostgres, tmp_path: Path) -> None:
    url = resolve_database_url(throwaway_postgres.url, tmp_path)
    store = await open_store(url, StoreSettings(timeout_s=2.0, pool_size=2))
    try:
        await store.create_team(TeamRecord("t1", "Team one"))
        throwaway_postgres.stop()
        for operation in (store.get_team("t1"), store.write_usage([UsageRecord(datetime.now(UTC), "r")])):
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError) as caught:
                await operation
            assert time.monotonic() - started < 4.0
            assert "unavailable" in str(caught.value) or "did not answer" in str(caught.value)
        throwaway_postgres.start()
        # The pool drops its dead connections (pre-ping) and reconnects on its own.
        assert await store.get_team("t1") is not None
        await store.write_usage([UsageRecord(datetime.now(UTC), "r", key_id="k", cost_nano_usd=3)])
        assert await store.spend("key", "k", None) == 3
    finally:
        await store.aclose()


async def test_sqlite_lock_held_elsewhere(tmp_path: Path, migrated_sqlite_template: Path) -> None:
    url = resolve_database_url(copy_sqlite_template(migrated_sqlite_template, tmp_path), tmp_path)
    store = await open_store(url, StoreSettings(timeout_s=0.5))
    other = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await store.write_usage([UsageRecord(datetime.now(UTC), "r", key_id="k", cost_nano_usd=1)])
        assert time.monotonic() - started < 2.0
        assert await store.spend("key", "k", None) == 0  # readers are not blocked (WAL)
        other.execute("COMMIT")
        await store.write_usage([UsageRecord(datetime.now(UTC), "r", key_id="k", cost_nano_usd=1)])
        assert await store.spend("key", "k", None) == 1
        async with store.engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    finally:
        other.close()
        await store.aclose()


async def test_postgres_timeout_leaves_the_pool_usable(postgres_url: PostgresSchema, tmp_path: Path) -> None:
    """An operation cut by the timeout (here: a row lock held by another session) raises
    StoreUnavailableError, and the pool's connections still work afterwards."""
    url = resolve_database_url(postgres_url.url, tmp_path)
    await upgrade(url)
    store = await open_store(url, StoreSettings(timeout_s=1.0, pool_size=1))  # connects (revision check)
    await store.create_team(TeamRecord("t1", "Team one"))
    locker = await asyncpg.connect(MACHINE_POSTGRES, server_settings={"search_path": postgres_url.schema})
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("SELECT 1 FROM teams WHERE id = 't1' FOR UPDATE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as caught:
            await store.update_team(TeamRecord("t1", "Renamed"))
        assert time.monotonic() - started < 3.0
        assert "did not answer within 1s" in str(caught.value)
        await transaction.rollback()
        renamed = await store.update_team(TeamRecord("t1", "Renamed"))  # the one pooled connection
        assert renamed.display_name == "Renamed"
        assert await store.count_keys() == 0
    finally:
        await locker.close()
        await store.aclose()
