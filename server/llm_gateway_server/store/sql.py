"""`SqlStore`: the `Store` on SQLAlchemy 2 (async Core), for SQLite (aiosqlite) and PostgreSQL
(asyncpg), with Alembic migrations run at start.

Opening a store::

    url = resolve_database_url(settings.database_url, settings.data_dir)
    store = await open_store(url, settings.store)      # migrates to head unless migrate=False
    ...
    await store.aclose()

URLs (`resolve_database_url`): `postgresql://`, `postgres://` and `postgresql+asyncpg://` are
PostgreSQL through asyncpg; `sqlite:///relative/path`, `sqlite:////absolute/path` (and
`sqlite+aiosqlite://…`) a SQLite file; None the SQLite file `data_dir/gateway.db`. On PostgreSQL
these libpq query parameters are understood (asyncpg takes none of them as such):

- `options`: server settings as libpq passes them, e.g. `?options=-csearch_path%3Dtenant_a`
  (`-c name=value`, `-cname=value` or `--name=value`, space separated): sent as asyncpg
  `server_settings`, so every pooled connection (and Alembic's version table) uses that schema.
- `application_name`: a server setting too. `sslmode`: asyncpg's `ssl` (`disable` … `verify-full`).
- `connect_timeout`: seconds to establish a connection (default: `StoreSettings.timeout_s`).

SQLite: WAL journal (readers do not block the writer), `busy_timeout` = the operation timeout,
foreign keys on, `synchronous=NORMAL`. Several processes (`serve --workers`) share the file: a
write transaction starts with `BEGIN IMMEDIATE` (it waits for the write lock up front instead of
failing on a lock upgrade), reads with a plain `BEGIN`. PostgreSQL: a pool of
`StoreSettings.pool_size` connections per process (no overflow), pre-pinged at checkout so the
pool recovers by itself after a database restart.

Errors: every operation runs under `asyncio.timeout(StoreSettings.timeout_s)`. A timeout, a
refused or dropped connection, a locked SQLite file (`OperationalError`), a pool exhausted past
the timeout → `StoreUnavailableError`, whose message names the database without its password
and never carries SQL parameters. Unique violations → `AlreadyExistsError`; a missing team →
`NotFoundError`. Fields longer than their column (`models.MAX_*`) → `ValueError` (the admin API
validates first).

Migrations: `open_store(..., migrate=True)` reads `alembic_version`; when it already holds
`migrations.HEAD_REVISION` nothing else is loaded (Alembic is not even imported). Otherwise it
migrates on its own connection inside one transaction that also serializes concurrent starters:
`BEGIN IMMEDIATE` on SQLite, `pg_advisory_xact_lock` on PostgreSQL (DDL is transactional on
both, so a failed migration leaves nothing half done).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog
from sqlalchemy import (
    ColumnElement,
    Connection,
    Dialect,
    Row,
    Select,
    case,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, RowMapping, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ..config import StoreSettings
from ..tenancy.records import (
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
from .base import (
    AlreadyExistsError,
    NotFoundError,
    ScopeKind,
    Store,
    StoreError,
    StoreUnavailableError,
    TeamNotEmptyError,
)
from .migrations import HEAD_REVISION, MIGRATIONS_DIR
from .models import (
    MAX_DISPLAY_NAME,
    MAX_GLOB,
    MAX_GLOBS,
    MAX_ID,
    MAX_OWNER,
    MAX_SECRET_PREFIX,
    USAGE_STRING_LENGTHS,
    api_keys,
    teams,
    usage_records,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Execution option that makes the SQLite "begin" hook emit BEGIN IMMEDIATE (write transactions).
_SQLITE_IMMEDIATE = "llm_gateway_sqlite_immediate"
# pg_advisory_xact_lock key held while migrating (serializes gateways starting together).
_PG_MIGRATION_LOCK = 0x6C6C_6D67_7731  # "llmgw1"
# A migration waits this long for another process's migration (lock) and runs at most this long.
_MIGRATION_LOCK_WAIT_S = 120.0
_MIGRATION_TIMEOUT_S = 300.0
_DEFAULT_DB_FILE = "gateway.db"
_MESSAGE_CHARS = 300
_HEX = frozenset("0123456789abcdef")
# PostgreSQL SQLSTATEs (classes) meaning "cannot use the database now": connection exception,
# invalid authorization, no such database, insufficient resources (too many connections),
# operator intervention (shutdown, cannot connect now).
_UNAVAILABLE_SQLSTATES = ("08", "28", "3D", "53", "57P")


# --- URLs ----------------------------------------------------------------------------------------


def resolve_database_url(database_url: str | None, data_dir: Path) -> str:
    """The SQLAlchemy async URL of the control plane's database.

    Args:
        database_url: `Settings.database_url`: `postgresql://…`, `postgres://…`,
            `postgresql+asyncpg://…`, `sqlite:///path` or `sqlite+aiosqlite:///path`; None: the
            default SQLite file.
        data_dir: `Settings.data_dir`: with None, created (mode 0o700) and `gateway.db` in it
            is the database (created mode 0o600 when missing).
    Returns:
        `postgresql+asyncpg://…` (query kept as given) or `sqlite+aiosqlite:///…`. The parent
        directory of a SQLite file is created (mode 0o700) when missing.
    Raises:
        ValueError: not a PostgreSQL or SQLite URL, or another driver (the message holds no
            password).
    """
    if database_url is None:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = (data_dir / _DEFAULT_DB_FILE).resolve()
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        return f"sqlite+aiosqlite:///{path}"
    url = _parse_url(database_url)
    backend, _, driver = url.drivername.partition("+")
    if backend in ("postgresql", "postgres") and driver in ("", "asyncpg"):
        url = url.set(drivername="postgresql+asyncpg")
    elif backend == "sqlite" and driver in ("", "aiosqlite"):
        url = url.set(drivername="sqlite+aiosqlite")
        if url.database and url.database != ":memory:" and not url.query.get("uri"):
            Path(url.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    else:
        raise ValueError(
            f"unsupported database URL {url.drivername}://…: use postgresql://, postgresql+asyncpg:// or sqlite:///"
        )
    return url.render_as_string(hide_password=False)


def safe_url(url: str | URL) -> str:
    """The URL as it may be logged: password (and a `password` query parameter) hidden."""
    parsed = url if isinstance(url, URL) else _parse_url(url)
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True)


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        raise ValueError("database_url is not a valid database URL") from None


def _server_options(options: str) -> dict[str, str]:
    """libpq `options` (`-c a=b -cc=d --e=f`) → {"a": "b", "c": "d", "e": "f"}.

    Raises:
        ValueError: an entry that is not a `name=value` server setting.
    """
    settings: dict[str, str] = {}
    tokens = iter(shlex.split(options))
    for token in tokens:
        if token == "-c":
            entry = next(tokens, "")
        elif token.startswith(("--", "-c")):
            entry = token[2:]
        else:
            raise ValueError(f"database URL options: {token!r} is not a -c name=value server setting")
        name, equals, value = entry.partition("=")
        if not equals or not name:
            raise ValueError(f"database URL options: {entry!r} is not name=value")
        settings[name.replace("-", "_")] = value
    return settings


def _query_str(query: Mapping[str, str | tuple[str, ...]], name: str) -> str | None:
    value = query.get(name)
    if isinstance(value, tuple):
        return value[-1] if value else None
    return value


def _create_engine(
    url: URL, settings: StoreSettings, *, pooled: bool, busy_timeout_s: float | None = None
) -> AsyncEngine:
    """An async engine for a resolved URL (see the module docstring for what is set). SQL
    parameters (digests, end-user ids) never appear in SQLAlchemy's logs or error messages.

    Args:
        pooled: a connection pool (the store) or NullPool (one-off connections: migrations).
        busy_timeout_s: SQLite's wait for a lock, seconds (default: `settings.timeout_s`).
    """
    kwargs: dict[str, Any] = {}
    if not pooled:
        kwargs["poolclass"] = NullPool
    elif url.get_backend_name() != "sqlite" or url.database not in (None, "", ":memory:"):  # memory: StaticPool
        kwargs.update(pool_size=settings.pool_size, max_overflow=0, pool_timeout=settings.timeout_s)
    if url.get_backend_name() == "sqlite":
        busy = settings.timeout_s if busy_timeout_s is None else busy_timeout_s
        engine = create_async_engine(url, connect_args={"timeout": busy}, hide_parameters=True, **kwargs)
        _configure_sqlite(engine, busy)
        return engine
    query = dict(url.query)
    server_settings = _server_options(_query_str(query, "options") or "")
    application_name = _query_str(query, "application_name")
    if application_name:
        server_settings["application_name"] = application_name
    connect_args: dict[str, Any] = {"server_settings": server_settings}
    connect_timeout = _query_str(query, "connect_timeout")
    connect_args["timeout"] = float(connect_timeout) if connect_timeout else settings.timeout_s
    sslmode = _query_str(query, "sslmode")
    if sslmode:
        connect_args["ssl"] = sslmode
    url = url.difference_update_query(["options", "application_name", "connect_timeout", "sslmode"])
    return create_async_engine(url, connect_args=connect_args, pool_pre_ping=pooled, hide_parameters=True, **kwargs)


def _configure_sqlite(engine: AsyncEngine, busy_timeout_s: float) -> None:
    """Connection pragmas, and SQLAlchemy (not the sqlite3 module) emitting BEGIN (SQLAlchemy's
    documented recipe: the driver's legacy mode starts no transaction for SELECT or DDL)."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_SQLITE_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# --- opening and migrating -------------------------------------------------------------------------


async def open_store(url: str, settings: StoreSettings, *, migrate: bool = True) -> SqlStore:
    """Creates the engine for `url` (from `resolve_database_url`) and, with `migrate`, brings the
    database to `migrations.HEAD_REVISION`.

    Without `migrate` nothing touches the database here (the first operation connects), so a
    gateway can start while the database is down.

    Raises:
        StoreUnavailableError: (migrate) the database cannot be reached within the timeout.
        StoreError: (migrate) the database is at a revision this code does not know.
        ValueError: a malformed URL (see `resolve_database_url`).
    """
    parsed = _parse_url(url)
    store = SqlStore(_create_engine(parsed, settings, pooled=True), settings, display_url=safe_url(parsed))
    if not migrate:
        return store
    try:
        if await store.revision() != HEAD_REVISION:
            await _migrate(parsed, settings, store)
    except BaseException:
        await store.aclose()
        raise
    return store


async def upgrade(url: str, settings: StoreSettings | None = None) -> str:
    """Migrates the database at `url` to head (`llm-gateway db upgrade`) and returns the revision
    it is at.

    Raises:
        StoreUnavailableError, StoreError, ValueError: as `open_store`.
    """
    store = await open_store(url, settings or StoreSettings(), migrate=True)
    try:
        return await store.revision() or ""
    finally:
        await store.aclose()


async def _migrate(url: URL, settings: StoreSettings, store: SqlStore) -> None:
    """Runs Alembic to head on a one-off connection, in one transaction holding the migration
    lock, bounded by `_MIGRATION_TIMEOUT_S`."""
    started = time.perf_counter()
    engine = _create_engine(url, settings, pooled=False, busy_timeout_s=_MIGRATION_LOCK_WAIT_S)
    sqlite = engine.dialect.name == "sqlite"
    before: str | None = None
    after: str | None = None
    try:
        async with asyncio.timeout(_MIGRATION_TIMEOUT_S), engine.connect() as conn:
            if sqlite:
                await conn.execution_options(**{_SQLITE_IMMEDIATE: True})
            async with conn.begin():
                if not sqlite:
                    await conn.execute(text(f"SET LOCAL lock_timeout = '{int(_MIGRATION_LOCK_WAIT_S)}s'"))
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
                before = await _current_revision(conn)
                if before != HEAD_REVISION:
                    await conn.run_sync(_alembic_upgrade)
                after = await _current_revision(conn)
    except TimeoutError:
        raise StoreUnavailableError(
            f"migrating {store.safe_url}: not done within {_MIGRATION_TIMEOUT_S:g}s (another process holding the lock?)"
        ) from None
    except store.connection_error_types as exc:
        problem = store.describe_unavailable(exc)
        if problem is not None:
            raise StoreUnavailableError(f"migrating {store.safe_url}: {problem}") from None
        if isinstance(exc, DBAPIError):  # e.g. the search_path schema does not exist
            reason = store.scrub(str(exc.orig if exc.orig is not None else exc))
            raise StoreError(f"migrating {store.safe_url}: {reason}") from None
        raise
    finally:
        await engine.dispose()
    if before != after:
        log.info(
            "store_migrated",
            database=store.safe_url,
            from_revision=before or "",
            revision=after or "",
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        )


def _alembic_upgrade(connection: Connection) -> None:
    """`alembic upgrade head` on `connection` (inside the caller's transaction)."""
    from alembic import command  # noqa: PLC0415 - only when a migration is due (start-up fast path)
    from alembic.config import Config  # noqa: PLC0415
    from alembic.util import CommandError  # noqa: PLC0415

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    try:
        command.upgrade(config, "head")
    except CommandError as exc:
        raise StoreError(f"cannot migrate the database: {exc} (was it migrated by a newer gateway?)") from None


async def _current_revision(conn: AsyncConnection) -> str | None:
    """The revision in `alembic_version`, or None when the table is missing or empty."""
    if conn.dialect.name == "sqlite":
        probe = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
    else:
        probe = "SELECT to_regclass('alembic_version') IS NOT NULL"
    if not await conn.scalar(text(probe)):
        return None
    revisions = sorted((await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars())
    return ",".join(revisions) or None


# --- records <-> rows ------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _check_length(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise ValueError(f"{field} is longer than {limit} characters")


def _check_scope(record: KeyRecord | TeamRecord) -> None:
    """Field bounds shared by keys and teams (the columns' lengths).

    Raises:
        ValueError: a field that does not fit.
    """
    _check_length("id", record.id, MAX_ID)
    _check_length("display_name", record.display_name, MAX_DISPLAY_NAME)
    if len(record.allowed_models) > MAX_GLOBS:
        raise ValueError(f"allowed_models has more than {MAX_GLOBS} globs")
    for glob in record.allowed_models:
        _check_length("an allowed_models glob", glob, MAX_GLOB)


def _check_digest(field: str, value: str, *, required: bool) -> None:
    if (value or required) and (len(value) != 64 or not set(value) <= _HEX):
        raise ValueError(f"{field} must be 64 lower-case hex characters")


def _scope_values(record: KeyRecord | TeamRecord) -> dict[str, Any]:
    """The allowed-models, limits and budget columns of a key or team."""
    budget = record.budget
    return {
        "display_name": record.display_name,
        "allowed_models": json.dumps(list(record.allowed_models)),
        "rpm": record.limits.rpm,
        "tpm": record.limits.tpm,
        "max_concurrent_streams": record.limits.max_concurrent_streams,
        "budget_limit_nano_usd": None if budget is None else budget.limit_nano_usd,
        "budget_period": None if budget is None else budget.period.value,
    }


def _key_values(key: KeyRecord) -> dict[str, Any]:
    """Every column of `api_keys` but id and the create/update times.

    Raises:
        ValueError: a field that does not fit its column.
    """
    _check_scope(key)
    _check_length("team_id", key.team_id, MAX_ID)
    _check_length("secret_prefix", key.secret_prefix, MAX_SECRET_PREFIX)
    _check_length("owner", key.owner, MAX_OWNER)
    _check_digest("secret_sha256", key.secret_sha256, required=True)
    _check_digest("previous_secret_sha256", key.previous_secret_sha256, required=False)
    return {
        **_scope_values(key),
        "secret_sha256": key.secret_sha256,
        "secret_prefix": key.secret_prefix,
        "team_id": key.team_id or None,
        "expire_time": key.expire_time,
        "disabled": key.disabled,
        "revoke_time": key.revoke_time,
        "previous_secret_sha256": key.previous_secret_sha256 or None,
        "previous_secret_expire_time": key.previous_secret_expire_time,
        "configured": key.configured,
        "owner": key.owner,
    }


def _limits_budget(row: RowMapping) -> tuple[Limits, Budget | None]:
    limits = Limits(rpm=row["rpm"], tpm=row["tpm"], max_concurrent_streams=row["max_concurrent_streams"])
    limit, period = row["budget_limit_nano_usd"], row["budget_period"]
    budget = None if limit is None or period is None else Budget(int(limit), BudgetPeriod(period))
    return limits, budget


def _globs(value: str) -> tuple[str, ...]:
    return tuple(str(glob) for glob in json.loads(value))


def _team_from_row(row: Row[Any]) -> TeamRecord:
    m = row._mapping
    limits, budget = _limits_budget(m)
    return TeamRecord(
        id=m["id"],
        display_name=m["display_name"],
        allowed_models=_globs(m["allowed_models"]),
        limits=limits,
        budget=budget,
        create_time=m["create_time"],
        update_time=m["update_time"],
    )


def _key_from_row(row: Row[Any]) -> KeyRecord:
    m = row._mapping
    limits, budget = _limits_budget(m)
    return KeyRecord(
        id=m["id"],
        display_name=m["display_name"],
        secret_sha256=m["secret_sha256"],
        secret_prefix=m["secret_prefix"],
        team_id=m["team_id"] or "",
        allowed_models=_globs(m["allowed_models"]),
        limits=limits,
        budget=budget,
        expire_time=m["expire_time"],
        disabled=bool(m["disabled"]),
        create_time=m["create_time"],
        update_time=m["update_time"],
        revoke_time=m["revoke_time"],
        previous_secret_sha256=m["previous_secret_sha256"] or "",
        previous_secret_expire_time=m["previous_secret_expire_time"],
        configured=bool(m["configured"]),
        owner=m["owner"],
    )


# The ledger's columns in insert order (everything but the autoincrement id).
_USAGE_COLUMNS = tuple(column.name for column in usage_records.c if column.name != "id")


def _usage_insert_sql(dialect: Dialect) -> str:
    """`INSERT INTO usage_records (...) VALUES (?, ...)` in the driver's own parameter style
    (`?` for sqlite3, `$n` for asyncpg), for an executemany straight on the driver."""
    quote = dialect.identifier_preparer.quote
    if dialect.paramstyle == "qmark":
        params = ", ".join("?" for _ in _USAGE_COLUMNS)
    elif dialect.paramstyle == "numeric_dollar":
        params = ", ".join(f"${n}" for n in range(1, len(_USAGE_COLUMNS) + 1))
    else:
        raise RuntimeError(f"unexpected DB-API paramstyle {dialect.paramstyle!r}")
    return f"INSERT INTO {quote('usage_records')} ({', '.join(map(quote, _USAGE_COLUMNS))}) VALUES ({params})"


# `_usage_params` builds rows in this order; checked against the table at import.
_USAGE_ORDER = (
    "time",
    "day",
    *USAGE_STRING_LENGTHS,
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_nano_usd",
    "saved_cost_nano_usd",
    "latency_ms",
    "ttft_ms",
    "cache_hit",
    "attempts",
)
if _USAGE_ORDER != _USAGE_COLUMNS:
    raise RuntimeError("store/sql.py: _USAGE_ORDER does not match the usage_records columns")
_L = USAGE_STRING_LENGTHS


def _usage_params(r: UsageRecord, bind_time: Callable[[datetime], Any]) -> tuple[Any, ...]:
    """A ledger row in `_USAGE_COLUMNS` order, as the driver takes it (`bind_time`: the
    UTCDateTime bind processor of the dialect). Strings longer than their column are truncated:
    a ledger write never fails on a client's long model name or end-user id."""
    utc = r.time.replace(tzinfo=UTC) if r.time.tzinfo is None else r.time.astimezone(UTC)
    return (
        bind_time(utc),
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}",
        r.request_id[: _L["request_id"]],
        r.key_id[: _L["key_id"]],
        r.team_id[: _L["team_id"]],
        r.end_user_id[: _L["end_user_id"]],
        r.method[: _L["method"]],
        r.model[: _L["model"]],
        r.provider[: _L["provider"]],
        r.deployment[: _L["deployment"]],
        r.status_code[: _L["status_code"]],
        r.reason[: _L["reason"]],
        r.input_tokens,
        r.output_tokens,
        r.cached_input_tokens,
        r.cache_write_tokens,
        r.reasoning_tokens,
        r.cost_nano_usd,
        r.saved_cost_nano_usd,
        float(r.latency_ms),
        None if r.ttft_ms is None else float(r.ttft_ms),
        bool(r.cache_hit),
        r.attempts,
    )


_GROUP_COLUMNS = {
    UsageGroupBy.KEY: usage_records.c.key_id,
    UsageGroupBy.TEAM: usage_records.c.team_id,
    UsageGroupBy.MODEL: usage_records.c.model,
    UsageGroupBy.PROVIDER: usage_records.c.provider,
    UsageGroupBy.DAY: usage_records.c.day,
}
_SUMMED = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_nano_usd",
    "saved_cost_nano_usd",
)


def _total(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """SUM(column), 0 over no rows (PostgreSQL sums BIGINT as NUMERIC: read back with int())."""
    return func.coalesce(func.sum(column), 0)


def _usage_select(query: UsageQuery) -> Select[Any]:
    """The GROUP BY query of `query` (see `UsageQuery`)."""
    c = usage_records.c
    groups = [_GROUP_COLUMNS[g] for g in dict.fromkeys(query.group_by)]
    stmt = select(
        *groups,
        func.count().label("requests"),
        *(_total(c[name]).label(name) for name in _SUMMED),
        _total(case((c.status_code != "OK", 1), else_=0)).label("errors"),
        _total(case((c.cache_hit.is_(True), 1), else_=0)).label("cache_hits"),
    )
    for column, value in ((c.key_id, query.key_id), (c.team_id, query.team_id), (c.model, query.model)):
        if value:
            stmt = stmt.where(column == value)
    if query.provider:
        stmt = stmt.where(c.provider == query.provider)
    if query.start is not None:
        stmt = stmt.where(c.time >= query.start)
    if query.end is not None:
        stmt = stmt.where(c.time < query.end)
    if groups:
        stmt = stmt.group_by(*groups).order_by(*groups)
    return stmt.limit(query.limit).offset(query.offset)


def _usage_row(row: Row[Any]) -> UsageRow:
    m = row._mapping
    return UsageRow(
        key_id=m.get("key_id", ""),
        team_id=m.get("team_id", ""),
        model=m.get("model", ""),
        provider=m.get("provider", ""),
        day=m.get("day", ""),
        requests=int(m["requests"]),
        errors=int(m["errors"]),
        cache_hits=int(m["cache_hits"]),
        **{name: int(m[name]) for name in _SUMMED},
    )


def _constraint(exc: IntegrityError) -> str:
    """What an integrity error names: asyncpg's constraint name, else the driver's message
    (SQLite: 'UNIQUE constraint failed: api_keys.display_name')."""
    cause = exc.orig.__cause__ if exc.orig is not None else None
    name = getattr(cause, "constraint_name", None)
    return name if isinstance(name, str) and name else str(exc.orig)


# --- the store -------------------------------------------------------------------------------------


class SqlStore(Store):
    """The store on one SQLAlchemy async engine (see the module docstring). Build it with
    `open_store`.

    Attributes:
        safe_url: the database URL without its password (for logs and messages).
        dialect: "sqlite" or "postgresql".
        connection_error_types: the exception types `describe_unavailable` inspects.
    """

    def __init__(self, engine: AsyncEngine, settings: StoreSettings, *, display_url: str) -> None:
        self._engine = engine
        self._timeout_s = settings.timeout_s
        self.dialect = engine.dialect.name
        self.safe_url = display_url
        password = engine.url.password
        self._secrets = tuple(s for s in {password} if isinstance(s, str) and s)
        sqlite = self.dialect == "sqlite"
        self._writer = engine.execution_options(**{_SQLITE_IMMEDIATE: True}) if sqlite else engine
        types: list[type[BaseException]] = [OSError, SQLAlchemyError]
        asyncpg = sys.modules.get("asyncpg")  # loaded by the dialect when it is PostgreSQL
        if asyncpg is not None:
            types += [asyncpg.PostgresError, asyncpg.InterfaceError]
        self.connection_error_types: tuple[type[BaseException], ...] = tuple(types)
        # The ledger insert goes straight to the driver's executemany: SQLAlchemy's per-row
        # parameter processing costs more than SQLite's insert itself (500 rows: ~6 ms vs ~3 ms).
        self._usage_insert = _usage_insert_sql(engine.dialect)
        # dialect_impl: the dialect's DATETIME processing too (SQLite's fixed-width text, the
        # format every comparison parameter gets), not only UTCDateTime's own conversion.
        bind_time = usage_records.c.time.type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
        if bind_time is None:  # UTCDateTime always has one; guards a change of its impl
            raise RuntimeError("UTCDateTime has no bind processor")
        self._bind_time: Callable[[datetime], Any] = bind_time

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy engine (tests and tools; the gateway uses the methods)."""
        return self._engine

    # --- error handling ------------------------------------------------------------------------

    def scrub(self, message: str) -> str:
        """`message` without the database password, first line only, clipped."""
        for secret in self._secrets:
            message = message.replace(secret, "***")
        first = message.strip().splitlines()[0] if message.strip() else ""
        return first[:_MESSAGE_CHARS]

    def describe_unavailable(self, exc: BaseException) -> str | None:
        """A one-line, password-free reason when `exc` means the database cannot be used now
        (connection refused/lost/timed out, locked, pool exhausted); None for other errors."""
        if isinstance(exc, OSError | PoolTimeoutError):
            return self.scrub(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, DBAPIError):
            sqlstate = getattr(exc.orig, "sqlstate", None) or ""
            if (
                exc.connection_invalidated
                or isinstance(exc, OperationalError | InterfaceError)
                or sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
            ):
                orig = exc.orig if exc.orig is not None else exc
                driver = orig.__cause__ if isinstance(orig.__cause__, Exception) else orig  # asyncpg's own
                return self.scrub(f"{type(driver).__name__}: {orig}")
            return None
        if isinstance(exc, SQLAlchemyError):
            return None
        asyncpg = sys.modules.get("asyncpg")
        if asyncpg is not None and isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
            return self.scrub(f"{type(exc).__name__}: {exc}")
        return None

    async def _bounded(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """`operation()` under the store's timeout, connection failures → StoreUnavailableError."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await operation()
        except TimeoutError:
            raise StoreUnavailableError(
                f"{what}: the database {self.safe_url} did not answer within {self._timeout_s:g}s"
            ) from None
        except self.connection_error_types as exc:
            problem = self.describe_unavailable(exc)
            if problem is None:
                raise
            raise StoreUnavailableError(f"{what}: the database {self.safe_url} is unavailable: {problem}") from None

    async def _fetch_one(self, stmt: Select[Any]) -> Row[Any] | None:
        async with self._engine.connect() as conn:
            row: Row[Any] | None = (await conn.execute(stmt)).first()
            return row

    async def _fetch_all(self, stmt: Select[Any]) -> Sequence[Row[Any]]:
        async with self._engine.connect() as conn:
            rows: Sequence[Row[Any]] = (await conn.execute(stmt)).all()
            return rows

    async def _scalar(self, stmt: Select[Any]) -> Any:
        async with self._engine.connect() as conn:
            return await conn.scalar(stmt)

    @staticmethod
    def _conflict(exc: IntegrityError, record: KeyRecord | TeamRecord) -> StoreError:
        """The store error an integrity error on inserting/updating `record` means."""
        what = _constraint(exc)
        if "foreign key" in what.lower() or what.startswith("fk_"):
            team_id = record.team_id if isinstance(record, KeyRecord) else record.id
            return NotFoundError(f"team {team_id!r} does not exist")
        if "display_name" in what:
            return AlreadyExistsError("display_name", record.display_name)
        if "secret_sha256" in what and isinstance(record, KeyRecord):
            return AlreadyExistsError("secret", f"{record.secret_prefix}…")
        if what.startswith("pk_") or what.endswith(".id"):
            return AlreadyExistsError("id", record.id)
        return StoreError(f"integrity error: {what.splitlines()[0][:_MESSAGE_CHARS]}")

    # --- teams ---------------------------------------------------------------------------------

    async def create_team(self, team: TeamRecord) -> TeamRecord:
        """Inserts a team; sets its create and update times.

        Raises:
            AlreadyExistsError: "id" or "display_name" taken. ValueError: a field too long.
            StoreUnavailableError: the database did not answer in time.
        """
        _check_scope(team)
        now = _now()
        values = {**_scope_values(team), "id": team.id, "create_time": now, "update_time": now}

        async def operation() -> TeamRecord:
            try:
                async with self._writer.begin() as conn:
                    await conn.execute(insert(teams).values(values))
            except IntegrityError as exc:
                raise self._conflict(exc, team) from None
            return replace(team, create_time=now, update_time=now)

        return await self._bounded("create_team", operation)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        """The team, or None. Raises StoreUnavailableError."""

        async def operation() -> TeamRecord | None:
            row = await self._fetch_one(select(teams).where(teams.c.id == team_id))
            return None if row is None else _team_from_row(row)

        return await self._bounded("get_team", operation)

    async def list_teams(self, after_id: str, limit: int) -> list[TeamRecord]:
        """Up to `limit` teams with id > `after_id`, by id. Raises StoreUnavailableError."""

        async def operation() -> list[TeamRecord]:
            stmt = select(teams).where(teams.c.id > after_id).order_by(teams.c.id).limit(limit)
            return [_team_from_row(row) for row in await self._fetch_all(stmt)]

        return await self._bounded("list_teams", operation)

    async def update_team(self, team: TeamRecord) -> TeamRecord:
        """Replaces display name, allowed models, limits and budget; sets the update time.

        Raises:
            NotFoundError: no such team. AlreadyExistsError: "display_name" taken.
            ValueError: a field too long. StoreUnavailableError.
        """
        _check_scope(team)
        values = {**_scope_values(team), "update_time": _now()}

        async def operation() -> TeamRecord:
            stmt = update(teams).where(teams.c.id == team.id).values(values).returning(*teams.c)
            try:
                async with self._writer.begin() as conn:
                    row = (await conn.execute(stmt)).first()
            except IntegrityError as exc:
                raise self._conflict(exc, team) from None
            if row is None:
                raise NotFoundError(f"team {team.id!r} does not exist")
            return _team_from_row(row)

        return await self._bounded("update_team", operation)

    async def delete_team(self, team_id: str) -> None:
        """Deletes a team; its revoked keys keep their records, without a team (the ledger keeps
        the team id of their calls).

        Raises:
            NotFoundError: no such team. TeamNotEmptyError: keys that are not revoked belong to
                it. StoreUnavailableError.
        """

        async def operation() -> None:
            async with self._writer.begin() as conn:
                # FOR UPDATE (PostgreSQL): a key being created for the team waits, then finds it gone.
                found = await conn.scalar(select(teams.c.id).where(teams.c.id == team_id).with_for_update())
                if found is None:
                    raise NotFoundError(f"team {team_id!r} does not exist")
                live = await conn.scalar(
                    select(func.count())
                    .select_from(api_keys)
                    .where(api_keys.c.team_id == team_id, api_keys.c.revoke_time.is_(None))
                )
                if live:
                    raise TeamNotEmptyError(int(live))
                await conn.execute(update(api_keys).where(api_keys.c.team_id == team_id).values(team_id=None))
                await conn.execute(delete(teams).where(teams.c.id == team_id))

        await self._bounded("delete_team", operation)

    # --- keys ----------------------------------------------------------------------------------

    async def create_key(self, key: KeyRecord) -> KeyRecord:
        """Inserts a key; sets its create and update times.

        Raises:
            AlreadyExistsError: "id", "display_name" or "secret" taken. NotFoundError: its team
                does not exist. ValueError: a field too long or a malformed digest.
                StoreUnavailableError.
        """
        values = {**_key_values(key), "id": key.id}
        now = _now()
        values.update(create_time=now, update_time=now)

        async def operation() -> KeyRecord:
            try:
                async with self._writer.begin() as conn:
                    await conn.execute(insert(api_keys).values(values))
            except IntegrityError as exc:
                raise self._conflict(exc, key) from None
            return replace(key, create_time=now, update_time=now)

        return await self._bounded("create_key", operation)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        """The key (revoked included), or None. Raises StoreUnavailableError."""

        async def operation() -> KeyRecord | None:
            row = await self._fetch_one(select(api_keys).where(api_keys.c.id == key_id))
            return None if row is None else _key_from_row(row)

        return await self._bounded("get_key", operation)

    async def find_key(self, secret_sha256: str) -> KeyRecord | None:
        """The key whose current (preferred) or previous secret has this digest, or None.
        Raises StoreUnavailableError."""
        if not secret_sha256:
            return None
        c = api_keys.c

        async def operation() -> KeyRecord | None:
            stmt = select(api_keys).where(
                or_(c.secret_sha256 == secret_sha256, c.previous_secret_sha256 == secret_sha256)
            )
            rows = await self._fetch_all(stmt.limit(2))
            rows = sorted(rows, key=lambda row: row._mapping["secret_sha256"] != secret_sha256)
            return _key_from_row(rows[0]) if rows else None

        return await self._bounded("find_key", operation)

    async def list_keys(self, team_id: str | None, after_id: str, limit: int, include_revoked: bool) -> list[KeyRecord]:
        """Up to `limit` keys with id > `after_id`, by id: of team `team_id` when given ("": the
        keys without a team), revoked ones only with `include_revoked`.
        Raises StoreUnavailableError."""

        async def operation() -> list[KeyRecord]:
            stmt = select(api_keys).where(api_keys.c.id > after_id)
            if team_id == "":
                stmt = stmt.where(api_keys.c.team_id.is_(None))
            elif team_id is not None:
                stmt = stmt.where(api_keys.c.team_id == team_id)
            if not include_revoked:
                stmt = stmt.where(api_keys.c.revoke_time.is_(None))
            rows = await self._fetch_all(stmt.order_by(api_keys.c.id).limit(limit))
            return [_key_from_row(row) for row in rows]

        return await self._bounded("list_keys", operation)

    async def update_key(self, key: KeyRecord) -> KeyRecord:
        """Replaces every field but id and create time; sets the update time.

        Raises:
            NotFoundError: no such key, or its new team does not exist. AlreadyExistsError:
                "display_name" or "secret" taken. ValueError: a field too long.
                StoreUnavailableError.
        """
        values = {**_key_values(key), "update_time": _now()}

        async def operation() -> KeyRecord:
            stmt = update(api_keys).where(api_keys.c.id == key.id).values(values).returning(*api_keys.c)
            try:
                async with self._writer.begin() as conn:
                    row = (await conn.execute(stmt)).first()
            except IntegrityError as exc:
                raise self._conflict(exc, key) from None
            if row is None:
                raise NotFoundError(f"key {key.id!r} does not exist")
            return _key_from_row(row)

        return await self._bounded("update_key", operation)

    async def count_keys(self) -> int:
        """Every key ever created, revoked ones included. Raises StoreUnavailableError."""

        async def operation() -> int:
            stmt = select(func.count()).select_from(api_keys)
            return int(await self._scalar(stmt))

        return await self._bounded("count_keys", operation)

    # --- usage ledger --------------------------------------------------------------------------

    async def write_usage(self, records: Sequence[UsageRecord]) -> None:
        """Inserts the records in one transaction (one executemany; all or none).

        Raises:
            StoreUnavailableError: the database did not answer in time (retry later).
            ValueError: a record does not fit (a count beyond BIGINT); nothing was written.
        """
        if not records:
            return
        rows = [_usage_params(record, self._bind_time) for record in records]

        async def operation() -> None:
            try:
                async with self._writer.begin() as conn:
                    await conn.exec_driver_sql(self._usage_insert, rows)
            except OverflowError:  # sqlite3: an int beyond 64 bits
                raise ValueError("a usage record does not fit the ledger's columns (a count beyond 2^63)") from None
            except DBAPIError as exc:  # asyncpg: refused the parameter (DataError, wrapped)
                if self.describe_unavailable(exc) is not None:
                    raise
                reason = self.scrub(str(exc.orig if exc.orig is not None else exc))
                raise ValueError(f"a usage record does not fit the ledger's columns: {reason}") from None

        await self._bounded("write_usage", operation)

    async def query_usage(self, query: UsageQuery) -> list[UsageRow]:
        """Sums per group, grouped, ordered and paged in SQL (see `UsageQuery`).
        Raises StoreUnavailableError."""

        async def operation() -> list[UsageRow]:
            return [_usage_row(row) for row in await self._fetch_all(_usage_select(query))]

        return await self._bounded("query_usage", operation)

    async def spend(self, kind: ScopeKind, scope_id: str, since: datetime | None) -> int:
        """nano-USD of the key's or team's calls at or after `since` (None: ever), exact.
        Raises StoreUnavailableError."""
        c = usage_records.c
        stmt = select(_total(c.cost_nano_usd)).where((c.key_id if kind == "key" else c.team_id) == scope_id)
        if since is not None:
            stmt = stmt.where(c.time >= since)

        async def operation() -> int:
            return int(await self._scalar(stmt))

        return await self._bounded("spend", operation)

    # --- operations ----------------------------------------------------------------------------

    async def revision(self) -> str | None:
        """The database's migration revision (None: not migrated). Raises StoreUnavailableError."""

        async def operation() -> str | None:
            async with self._engine.connect() as conn:
                return await _current_revision(conn)

        return await self._bounded("revision", operation)

    async def ping(self) -> None:
        """`SELECT 1`. Raises StoreUnavailableError."""

        async def operation() -> None:
            async with self._engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

        await self._bounded("ping", operation)

    async def aclose(self) -> None:
        """Closes the pool's connections (the store cannot be used afterwards)."""
        await self._engine.dispose()
