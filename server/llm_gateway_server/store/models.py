"""The control plane's tables (SQLAlchemy Core), for SQLite and PostgreSQL.

Three tables:

- `teams`: one row per team (`teams/{id}`).
- `api_keys`: one row per virtual key (`keys/{id}`), revoked keys included (the ledger refers
  to them); only the SHA-256 hex digest of a secret is stored (`secret_sha256`, unique, and
  `previous_secret_sha256` while a rotated-out secret is in its grace period).
- `usage_records`: the usage ledger, one row per call.

Conventions: money is integer nano-USD in BIGINT columns (exact sums on both databases); token
counts are BIGINT; times are `UTCDateTime` (PostgreSQL `timestamptz`; SQLite text in UTC), read
back as timezone-aware UTC `datetime`s; `usage_records.day` is the call's UTC day as
'YYYY-MM-DD', written at insert so grouping by day is the same plain GROUP BY on both databases.
`allowed_models` is a JSON array of globs in a TEXT column. Limits and budgets are nullable
columns (NULL: not set).

The migrations in `store/migrations/versions/` create exactly these tables (a test compares
them); a change here needs a new revision there.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator

# Column bounds (characters). The admin API validates against the same numbers; the store
# refuses longer key and team fields with ValueError and truncates longer ledger strings.
MAX_ID = 63  # resource ids: 1-63 chars of [a-z0-9-]
MAX_CONFIGURED_ID = 128  # ids of keys from the YAML file (`auth.keys[].id`), which the ledger records too
MAX_DISPLAY_NAME = 128
MAX_GLOBS = 64  # allowed_models: at most this many globs...
MAX_GLOB = 256  # ...of at most this many characters each
MAX_SECRET_PREFIX = 32
MAX_OWNER = 128
SHA256_HEX = 64

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time, stored in UTC and read back timezone-aware in UTC.

    PostgreSQL: `timestamptz`. SQLite: SQLAlchemy's DATETIME text ('YYYY-MM-DD HH:MM:SS.ffffff',
    fixed width, so text comparison is time order) of the UTC time without an offset. A naive
    `datetime` given as a parameter is taken as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Aware → UTC (naive on SQLite, which keeps no offset); naive → taken as UTC."""
        if value is None:
            return None
        utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Whatever the driver returns → aware UTC."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite makes only an INTEGER PRIMARY KEY an auto-incrementing rowid alias.
_BIGINT_ID = BigInteger().with_variant(Integer(), "sqlite")

teams = Table(
    "teams",
    metadata,
    Column("id", String(MAX_ID), primary_key=True),
    Column("display_name", String(MAX_DISPLAY_NAME), nullable=False, unique=True),
    Column("allowed_models", Text, nullable=False),
    Column("rpm", BigInteger),
    Column("tpm", BigInteger),
    Column("max_concurrent_streams", BigInteger),
    Column("budget_limit_nano_usd", BigInteger),
    Column("budget_period", String(16)),
    Column("create_time", UTCDateTime, nullable=False),
    Column("update_time", UTCDateTime, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(MAX_ID), primary_key=True),
    Column("display_name", String(MAX_DISPLAY_NAME), nullable=False, unique=True),
    Column("secret_sha256", String(SHA256_HEX), nullable=False),
    Column("secret_prefix", String(MAX_SECRET_PREFIX), nullable=False),
    Column("team_id", String(MAX_ID), ForeignKey("teams.id"), index=True),
    Column("allowed_models", Text, nullable=False),
    Column("rpm", BigInteger),
    Column("tpm", BigInteger),
    Column("max_concurrent_streams", BigInteger),
    Column("budget_limit_nano_usd", BigInteger),
    Column("budget_period", String(16)),
    Column("expire_time", UTCDateTime),
    Column("disabled", Boolean, nullable=False),
    Column("create_time", UTCDateTime, nullable=False),
    Column("update_time", UTCDateTime, nullable=False),
    Column("revoke_time", UTCDateTime),
    Column("previous_secret_sha256", String(SHA256_HEX), index=True),
    Column("previous_secret_expire_time", UTCDateTime),
    Column("configured", Boolean, nullable=False),
    Column("owner", String(MAX_OWNER), nullable=False),
    Index("ix_api_keys_secret_sha256", "secret_sha256", unique=True),
)

# Ledger string bounds (characters): longer values are truncated at insert, never refused.
USAGE_STRING_LENGTHS = {
    "request_id": 128,
    "key_id": MAX_CONFIGURED_ID,
    "team_id": MAX_ID,
    "end_user_id": 256,
    "method": 64,
    "model": 256,
    "provider": 64,
    "deployment": 256,
    "status_code": 32,
    "reason": 64,
}

usage_records = Table(
    "usage_records",
    metadata,
    Column("id", _BIGINT_ID, primary_key=True, autoincrement=True),
    Column("time", UTCDateTime, nullable=False),
    Column("day", String(10), nullable=False),
    *(Column(name, String(length), nullable=False) for name, length in USAGE_STRING_LENGTHS.items()),
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("cached_input_tokens", BigInteger, nullable=False),
    Column("cache_write_tokens", BigInteger, nullable=False),
    Column("reasoning_tokens", BigInteger, nullable=False),
    Column("cost_nano_usd", BigInteger, nullable=False),
    Column("saved_cost_nano_usd", BigInteger, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    Column("cache_hit", Boolean, nullable=False),
    Column("attempts", Integer, nullable=False),
    Index("ix_usage_records_time", "time"),
    Index("ix_usage_records_key_id_time", "key_id", "time"),
    Index("ix_usage_records_team_id_time", "team_id", "time"),
)
