"""The control plane's records, shared by the store, the data plane and the admin service.

Money is held as integer nano-USD (10⁻⁹ USD): exact in SQL BIGINT, in Redis `INCRBY` and in
Lua's doubles up to 2⁵³ nano-USD (about 9 million USD), and fine enough for calls of 10⁻⁷ USD
(100 nano-USD). Times are timezone-aware UTC `datetime`s. Budget periods are UTC calendar periods
(ISO weeks start on Monday).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

NANO_PER_USD = 1_000_000_000
# The largest amount a counter takes (2^53 - 1 nano-USD): Redis Lua adds doubles exactly below it.
MAX_NANO_USD = 2**53 - 1


def usd_to_nano(usd: float) -> int:
    """USD → nano-USD, rounded to the nearest, clamped to [0, MAX_NANO_USD] (NaN → 0)."""
    if not math.isfinite(usd) or usd <= 0:
        return MAX_NANO_USD if usd == math.inf else 0
    return min(round(usd * NANO_PER_USD), MAX_NANO_USD)


def nano_to_usd(nano: int) -> float:
    """nano-USD → USD."""
    return nano / NANO_PER_USD


class BudgetPeriod(enum.StrEnum):
    """How often a budget starts over (UTC calendar periods, or never)."""

    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    TOTAL = "total"


def period_bounds(period: BudgetPeriod, now: datetime) -> tuple[datetime | None, datetime | None]:
    """(start, end) of the period that contains `now` (UTC); (None, None) for TOTAL.

    `end` is exclusive: the instant the budget starts over.
    """
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period is BudgetPeriod.DAILY:
        return day, day + timedelta(days=1)
    if period is BudgetPeriod.WEEKLY:
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if period is BudgetPeriod.MONTHLY:
        start = day.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start, end
    return None, None


@dataclass(frozen=True, slots=True)
class Limits:
    """Rate limits of a key or team (None: the default for keys, none for teams).

    Attributes:
        rpm: requests per minute. tpm: tokens per minute. max_concurrent_streams: streams open
            at once.
    """

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    """A spending limit per period: `limit_nano_usd` nano-USD per `period`."""

    limit_nano_usd: int
    period: BudgetPeriod

    @property
    def limit_usd(self) -> float:
        """The limit in USD."""
        return nano_to_usd(self.limit_nano_usd)

    def bounds(self, now: datetime) -> tuple[datetime | None, datetime | None]:
        """The current period's (start, end); (None, None) for a lifetime budget."""
        return period_bounds(self.period, now)


@dataclass(frozen=True, slots=True)
class TeamRecord:
    """A team (`teams/{id}`).

    Attributes:
        id: the resource id (1-63 chars of `[a-z0-9-]`).
        allowed_models: model name globs the team's keys may call; empty: every model.
        limits: limits on all the team's keys together.
        budget: the team's budget (None: none).
    """

    id: str
    display_name: str
    allowed_models: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    budget: Budget | None = None
    create_time: datetime | None = None
    update_time: datetime | None = None

    @property
    def name(self) -> str:
        """`teams/{id}`."""
        return f"teams/{self.id}"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A virtual key (`keys/{id}`), stored without its secret.

    Attributes:
        id: the resource id (configured keys keep their YAML `id`).
        team_id: the key's team id, or "" for none.
        secret_sha256: SHA-256 hex digest of the secret (64 lower-case hex chars).
        secret_prefix: the secret's first characters (shown to tell keys apart).
        allowed_models: model name globs; empty: every model.
        limits: the key's own limits (None fields: the gateway's defaults).
        budget: the key's own budget (None: none).
        expire_time: when the key stops working (None: never).
        revoke_time: when it was revoked (None: not revoked); revocation is permanent.
        previous_secret_sha256 / previous_secret_expire_time: the secret replaced by the last
            rotation and until when it still works ("" / None: none).
        configured: from the YAML file (read-only through the API).
        owner: the cache and ledger tenant ("" : the key id; configured keys may name one).
    """

    id: str
    display_name: str
    secret_sha256: str
    secret_prefix: str = ""
    team_id: str = ""
    allowed_models: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    budget: Budget | None = None
    expire_time: datetime | None = None
    disabled: bool = False
    create_time: datetime | None = None
    update_time: datetime | None = None
    revoke_time: datetime | None = None
    previous_secret_sha256: str = ""
    previous_secret_expire_time: datetime | None = None
    configured: bool = False
    owner: str = ""

    @property
    def name(self) -> str:
        """`keys/{id}`."""
        return f"keys/{self.id}"

    @property
    def team_name(self) -> str:
        """`teams/{id}` of the key's team, or ""."""
        return f"teams/{self.team_id}" if self.team_id else ""

    @property
    def tenant(self) -> str:
        """Whose data this key's calls are (cache namespace, ledger): `owner` or the key id."""
        return self.owner or self.id


@dataclass(frozen=True, slots=True)
class SpendSeed:
    """A scope's spend in its current budget period as the ledger had it when loaded.

    Attributes:
        period_start: start of the period it is for (None: lifetime); a seed for another period
            than the current one counts as 0.
        spend_nano_usd: nano-USD recorded in that period.
    """

    period_start: datetime | None
    spend_nano_usd: int


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who a data-plane call is for, as the key cache resolved it: the key, its team (if any),
    and the ledger spend of each in its budget period when loaded (to seed budget counters)."""

    key: KeyRecord
    team: TeamRecord | None = None
    key_spend: SpendSeed | None = None
    team_spend: SpendSeed | None = None


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One call as the usage ledger records it.

    Attributes:
        time: when the call started (UTC).
        request_id: the call's request id.
        key_id / team_id: the key and its team ("" without).
        end_user_id: the request's `end_user_id` ("" when not sent).
        method: the RPC name, e.g. "Chat", "ChatStream", "Embed".
        model: the model the client asked for. provider / deployment: what served it (or was
            last tried; "" when none).
        input_tokens … reasoning_tokens: tokens (cached/cache-write are parts of input,
            reasoning a part of output).
        cost_nano_usd: the call's cost at catalog prices (0 for cache hits and refusals).
        saved_cost_nano_usd: for a cache hit, what the cached answer cost when first made.
        latency_ms: the call's wall time; ttft_ms: time to first token of a stream (None).
        status_code: the gRPC status name ("OK", "RESOURCE_EXHAUSTED", ...); reason: its
            ErrorInfo reason ("" when OK).
        cache_hit: answered from the response cache. attempts: upstream attempts made.
    """

    time: datetime
    request_id: str
    key_id: str = ""
    team_id: str = ""
    end_user_id: str = ""
    method: str = ""
    model: str = ""
    provider: str = ""
    deployment: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nano_usd: int = 0
    saved_cost_nano_usd: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    status_code: str = "OK"
    reason: str = ""
    cache_hit: bool = False
    attempts: int = 0

    @property
    def day(self) -> str:
        """The call's UTC day, YYYY-MM-DD."""
        return self.time.astimezone(UTC).strftime("%Y-%m-%d")


class UsageGroupBy(enum.StrEnum):
    """What usage sums are grouped by."""

    KEY = "key"
    TEAM = "team"
    MODEL = "model"
    PROVIDER = "provider"
    DAY = "day"


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """A ledger query: records matching every non-empty filter, in [start, end), summed per
    group of `group_by` values (in that order; empty: one row of totals), ordered by the group
    values, `limit` rows from `offset`."""

    key_id: str = ""
    team_id: str = ""
    model: str = ""
    provider: str = ""
    start: datetime | None = None
    end: datetime | None = None
    group_by: tuple[UsageGroupBy, ...] = ()
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Sums over the ledger records of one group; group values not grouped by are ""."""

    key_id: str = ""
    team_id: str = ""
    model: str = ""
    provider: str = ""
    day: str = ""
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_nano_usd: int = 0
    saved_cost_nano_usd: int = 0
    errors: int = 0
    cache_hits: int = 0
