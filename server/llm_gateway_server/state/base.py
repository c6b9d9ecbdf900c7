"""The state interfaces the interceptors use.

Rate limits count in fixed one-minute windows of wall-clock time (`window = floor(unix_time / 60)`),
so every process sharing a backend agrees on the window; a request reserves 1 request and its
estimated tokens atomically, and `reconcile` corrects the tokens once the real usage is known.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass

WINDOW_S = 60


class BackendUnavailableError(Exception):
    """The state backend (Redis) could not be reached within its timeout."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """The outcome of `acquire`.

    Attributes:
        allowed: whether the request may proceed (its request and tokens were reserved).
        exceeded: "requests" or "tokens" when refused.
        requests / tokens: counts in the window after this request (or as found when refused).
        window: the window index the reservation counts in.
        reset_s: seconds until the window ends.
    """

    allowed: bool
    exceeded: str
    requests: int
    tokens: int
    window: int
    reset_s: float
    reserved_tokens: int


# Token amounts the counters take: never negative, and below 2^53 so that Redis's Lua (doubles)
# adds them exactly.
MAX_TOKEN_AMOUNT = 2**53 - 1


def token_amount(tokens: int) -> int:
    """`tokens` as a counter may take it: clamped to [0, MAX_TOKEN_AMOUNT]. A negative estimate
    (or usage) must never be reserved or refunded: it would leave the window's counter wrong
    for every later call of the scope."""
    return min(max(int(tokens), 0), MAX_TOKEN_AMOUNT)


def current_window(now: float | None = None) -> tuple[int, float]:
    """(window index, seconds until it ends) for wall-clock `now` (default: time.time())."""
    now = time.time() if now is None else now
    window = int(now // WINDOW_S)
    return window, (window + 1) * WINDOW_S - now


class RateLimitBackend(abc.ABC):
    """Atomic check-and-reserve of per-scope request and token counts, and concurrent streams."""

    @abc.abstractmethod
    async def acquire(self, scope: str, rpm: int | None, tpm: int | None, tokens: int) -> Reservation:
        """Reserves 1 request and `tokens` in the current window if both fit (None: no limit).

        Raises:
            BackendUnavailableError: the backend did not answer in time.
        """

    @abc.abstractmethod
    async def reconcile(self, scope: str, reservation: Reservation, actual_tokens: int) -> None:
        """Replaces the reserved tokens with the real usage (same window)."""

    @abc.abstractmethod
    async def open_stream(self, scope: str, stream_id: str, limit: int, max_age_s: float) -> bool:
        """Registers an open stream if fewer than `limit` are open (entries older than
        `max_age_s` are dropped: a crashed process cannot leak slots forever)."""

    @abc.abstractmethod
    async def close_stream(self, scope: str, stream_id: str) -> None:
        """Unregisters a stream."""

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
