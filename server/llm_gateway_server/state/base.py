"""The state interfaces the interceptors use: quotas (rate limits and budgets) and the cache.

Quotas. One call to `QuotaBackend.admit` before an RPC checks and reserves, atomically, for up
to two scopes (a key `keys/{id}` and its team `teams/{id}`, or a client address `peer:…`):

- 1 request against the scope's requests per minute (`rpm`),
- the call's token estimate against its tokens per minute (`tpm`),
- a stream slot against its concurrent streams (`max_streams`, streams only),
- the call's cost estimate (nano-USD) against its budget for the current period.

One call to `settle` after the RPC replaces the reserved tokens and cost by the real ones and
releases the stream slot. On Redis each is one script call (one round trip).

Rate limits count in fixed one-minute windows of wall-clock time (`window = floor(unix_time /
60)`), so every process sharing a backend agrees on the window; stream slots are entries with
their start time, and entries older than the stream's maximum age are dropped (a crashed
process cannot leak slots forever).

Budgets. One counter per scope and period start holds committed spend plus outstanding
reservations, in nano-USD. A call is admitted while the counter is below the limit, then its
estimate is added; it is refused once the counter is at or above the limit. Hence, if every
call's real cost is at most its estimate, the admitted calls' total cost is below
`limit + one call's cost` (see `interceptors/quota.py` for the bound when estimates are low).
A counter that does not exist yet (a new period, a restart on the memory backend, Redis having
lost it) starts from the seed the key cache loaded from the spend ledger, so spend survives
restarts. Period counters expire `BUDGET_MARGIN_S` after the period ends; lifetime ones never.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field

from ..tenancy.records import MAX_NANO_USD, BudgetPeriod

WINDOW_S = 60
# How long a budget counter outlives its period (s): a call admitted just before the period
# ended settles into it.
BUDGET_MARGIN_S = 24 * 3600


class BackendUnavailableError(Exception):
    """The state backend (Redis) could not be reached within its timeout."""


# Token amounts the counters take: never negative, and below 2^53 so that Redis's Lua (doubles)
# adds them exactly.
MAX_TOKEN_AMOUNT = 2**53 - 1


def token_amount(tokens: int) -> int:
    """`tokens` as a counter may take it: clamped to [0, MAX_TOKEN_AMOUNT]. A negative estimate
    (or usage) must never be reserved or refunded: it would leave the window's counter wrong
    for every later call of the scope."""
    return min(max(int(tokens), 0), MAX_TOKEN_AMOUNT)


def nano_amount(nano_usd: int) -> int:
    """A nano-USD amount as a budget counter takes it: clamped to [0, MAX_NANO_USD]."""
    return min(max(int(nano_usd), 0), MAX_NANO_USD)


def current_window(now: float | None = None) -> tuple[int, float]:
    """(window index, seconds until it ends) for wall-clock `now` (unix s; default: time.time())."""
    now = time.time() if now is None else now
    window = int(now // WINDOW_S)
    return window, (window + 1) * WINDOW_S - now


@dataclass(frozen=True, slots=True)
class BudgetQuota:
    """A scope's budget for the period that contains the call.

    Attributes:
        limit_nano_usd: the limit, nano-USD per period.
        period: the budget's period kind (part of the counter's identity).
        start_s / end_s: the period's bounds, unix seconds (None for a lifetime budget).
        seed_nano_usd: the ledger's spend in this period when the key cache loaded it; used only
            when the period's counter does not exist yet.
    """

    limit_nano_usd: int
    period: BudgetPeriod
    start_s: int | None
    end_s: int | None
    seed_nano_usd: int = 0

    @property
    def counter(self) -> str:
        """The counter's name within its scope: `spend:{period}:{start}` (`spend:total`)."""
        return "spend:total" if self.start_s is None else f"spend:{self.period.value}:{self.start_s}"


@dataclass(frozen=True, slots=True)
class ScopeQuota:
    """What one scope checks (None: no such limit).

    Attributes:
        scope: `keys/{id}`, `teams/{id}` or `peer:{address}`.
        rpm / tpm: requests / tokens per minute. max_streams: concurrent streams (only streams
            take a slot). budget: the scope's budget for the current period.
    """

    scope: str
    rpm: int | None = None
    tpm: int | None = None
    max_streams: int | None = None
    budget: BudgetQuota | None = None

    @property
    def windowed(self) -> bool:
        """Whether the scope counts requests and tokens in windows (it has rpm or tpm)."""
        return self.rpm is not None or self.tpm is not None

    @property
    def empty(self) -> bool:
        """Whether the scope checks nothing."""
        return not self.windowed and self.max_streams is None and self.budget is None


@dataclass(frozen=True, slots=True)
class QuotaRequest:
    """One call's check-and-reserve.

    Attributes:
        tag: the tenant root (the team when the key has one, else the key, else the peer scope):
            every counter of every scope lives under this Redis Cluster hash tag, so one script
            touches one slot.
        scopes: the scopes, checked in order (the key's, then its team's).
        tokens: the token estimate reserved in every windowed scope.
        cost_nano_usd: the cost estimate reserved in every budgeted scope.
        stream_id: a unique id for a stream's slot ("" for a unary call: no slot).
        stream_max_age_s: how long a stream slot may live (bounds leaks from crashes).
        now: wall-clock time of the call, unix seconds (windows and slot times).
    """

    tag: str
    scopes: tuple[ScopeQuota, ...]
    tokens: int
    cost_nano_usd: int
    now: float
    stream_id: str = ""
    stream_max_age_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ScopeCount:
    """A scope's counters after the reservation (or as found when refused).

    Attributes:
        requests / tokens: in the current window (0 for a scope without rpm/tpm).
        spend_nano_usd: committed spend plus outstanding reservations in the period (0 without
            a budget).
    """

    requests: int = 0
    tokens: int = 0
    spend_nano_usd: int = 0


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of `admit`, and what `settle` needs.

    Attributes:
        allowed: whether the call may proceed.
        request: what was asked.
        window: the window index the reservation counts in; reset_s: seconds until it ends.
        counts: per scope of `request.scopes`, after the reservation (allowed) or the refusing
            scope's counters as found and zeros for the others (refused).
        refused: index of the refusing scope in `request.scopes` (-1 when allowed).
        exceeded: "budget", "requests", "tokens" or "streams" when refused ("" when allowed).
        keys: the backend's names for the scopes' counters (backend-private).
    """

    allowed: bool
    request: QuotaRequest
    window: int
    reset_s: float
    counts: tuple[ScopeCount, ...]
    refused: int = -1
    exceeded: str = ""
    keys: tuple[str, ...] = field(default=(), repr=False)

    @property
    def reserved_tokens(self) -> int:
        """Tokens this admission holds in each windowed scope."""
        return token_amount(self.request.tokens)

    @property
    def reserved_nano_usd(self) -> int:
        """nano-USD this admission holds in each budgeted scope."""
        return nano_amount(self.request.cost_nano_usd)

    @property
    def holds_streams(self) -> bool:
        """Whether this admission holds a stream slot in some scope."""
        return bool(self.request.stream_id)


class QuotaBackend(abc.ABC):
    """Atomic check-and-reserve of rate limits, stream slots and budgets for up to two scopes,
    and the settlement after the call (see module docstring)."""

    @abc.abstractmethod
    async def admit(self, request: QuotaRequest) -> Admission:
        """Checks every limit of every scope and, when all pass, reserves in every scope: 1
        request and `request.tokens` (windowed scopes), a stream slot (scopes with
        `max_streams`, when `request.stream_id` is set) and `request.cost_nano_usd` (budgeted
        scopes, whose period counter is created from its seed when absent). Nothing is
        reserved when one check fails.

        Raises:
            BackendUnavailableError: the backend did not answer in time.
        """

    @abc.abstractmethod
    async def settle(self, admission: Admission, tokens: int, cost_nano_usd: int) -> None:
        """Replaces the admission's reserved tokens and cost by the real `tokens` and
        `cost_nano_usd` (clamped to [0, 2^53)) in the counters it reserved in (same window,
        same period; counters that no longer exist are left alone; none goes below 0) and
        releases its stream slots.

        Raises:
            BackendUnavailableError: the backend did not answer in time.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook: in-memory backends hold nothing
        """Releases connections."""


class CacheBackend(abc.ABC):
    """Bytes by key with a time to live."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired.

        Raises:
            BackendUnavailableError: the backend did not answer in time.
        """

    @abc.abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        """Stores `value` for `ttl_s` seconds."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook: in-memory backends hold nothing
        """Releases connections."""
