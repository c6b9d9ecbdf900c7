"""A circuit breaker per deployment (closed → open → half-open → closed).

Pure logic with the clock passed in (seconds, monotonic), so it is testable without sleeping and
cheap on the hot path: one deque append per call outcome.
"""

from __future__ import annotations

import enum
from collections import deque

from ..config import BreakerSettings


class BreakerState(enum.StrEnum):
    """Closed: calls flow. Open: calls are skipped. Half-open: limited trial calls."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `consecutive_failures` failures in a row, or when at least `min_calls` calls in
    the last `window_s` seconds failed at `failure_rate` or more; after `cooldown_s` it half-opens and
    admits `half_open_max_calls` trial calls; a trial success closes it, a trial failure reopens it."""

    def __init__(self, settings: BreakerSettings) -> None:
        self._settings = settings
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._opened_at = 0.0
        self._trials = 0

    def state(self, now: float) -> BreakerState:
        """The state at `now` (an open breaker past its cooldown reads half-open)."""
        if self._state is BreakerState.OPEN and now - self._opened_at >= self._settings.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self._trials = 0
        return self._state

    def try_acquire(self, now: float) -> bool:
        """Whether a call may go through now; in half-open state this takes a trial slot."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._trials < self._settings.half_open_max_calls:
            self._trials += 1
            return True
        return False

    def release_trial(self, now: float) -> None:
        """Gives back a half-open trial slot taken by a call that ended with no outcome (skipped
        after admission, or cancelled), so the breaker cannot stay half-open forever."""
        if self.state(now) is BreakerState.HALF_OPEN and self._trials > 0:
            self._trials -= 1

    def record(self, now: float, success: bool) -> BreakerState:
        """Records a call outcome; returns the state after it."""
        if self._state is BreakerState.HALF_OPEN:
            if success:
                self._close()
            else:
                self._open(now)
            return self._state
        window = self._outcomes
        window.append((now, success))
        while window and now - window[0][0] > self._settings.window_s:
            window.popleft()
        self._consecutive = 0 if success else self._consecutive + 1
        if self._state is BreakerState.CLOSED and not success:
            failures = sum(1 for _, ok in window if not ok)
            by_rate = len(window) >= self._settings.min_calls and failures / len(window) >= self._settings.failure_rate
            if self._consecutive >= self._settings.consecutive_failures or by_rate:
                self._open(now)
        return self._state

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._trials = 0

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._outcomes.clear()
        self._trials = 0
