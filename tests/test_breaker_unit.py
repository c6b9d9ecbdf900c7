"""The circuit breaker and retry-delay logic with an explicit clock (pure, no I/O)."""

from __future__ import annotations

import random

from llm_gateway_server.config import BreakerSettings, RetrySettings
from llm_gateway_server.routing.breaker import BreakerState, CircuitBreaker
from llm_gateway_server.routing.retry import retry_delay


def test_opens_on_failure_rate_within_window() -> None:
    breaker = CircuitBreaker(BreakerSettings(consecutive_failures=100, failure_rate=0.5, min_calls=4, window_s=10))
    for t, ok in [(0, True), (1, True), (2, False)]:
        assert breaker.record(t, ok) is BreakerState.CLOSED
    assert breaker.record(3, False) is BreakerState.OPEN  # 2 of 4 failed


def test_old_outcomes_leave_the_window() -> None:
    breaker = CircuitBreaker(BreakerSettings(consecutive_failures=100, failure_rate=0.5, min_calls=4, window_s=10))
    for t, ok in [(0, False), (1, False), (2, True)]:
        breaker.record(t, ok)
    breaker.record(20, True)
    assert breaker.record(21, False) is BreakerState.CLOSED  # the early failures expired


def test_half_open_admits_limited_trials_and_recovers() -> None:
    breaker = CircuitBreaker(BreakerSettings(consecutive_failures=2, cooldown_s=5, half_open_max_calls=1))
    breaker.record(0, False)
    assert breaker.record(1, False) is BreakerState.OPEN
    assert not breaker.try_acquire(3)
    assert breaker.state(6) is BreakerState.HALF_OPEN
    assert breaker.try_acquire(6) and not breaker.try_acquire(6)  # one trial only
    assert breaker.record(7, True) is BreakerState.CLOSED
    assert breaker.try_acquire(7)


def test_failed_trial_reopens_for_a_new_cooldown() -> None:
    breaker = CircuitBreaker(BreakerSettings(consecutive_failures=1, cooldown_s=5))
    breaker.record(0, False)
    assert breaker.try_acquire(5)
    assert breaker.record(5, False) is BreakerState.OPEN
    assert not breaker.try_acquire(9) and breaker.try_acquire(10)


def test_retry_delay_full_jitter_and_retry_after() -> None:
    settings = RetrySettings(base_delay_s=0.5, max_delay_s=4, max_retry_after_s=10)
    rng = random.Random(7)
    delays = [retry_delay(settings, 3, None, rng) for _ in range(1000)]
    assert all(d is not None and 0 <= d <= 4 for d in delays)  # min(4, 0.5 * 2**3) = 4
    assert max(d for d in delays if d is not None) > 3.5
    assert retry_delay(settings, 0, 2.0, rng) == 2.0  # retry-after wins
    assert retry_delay(settings, 0, 11.0, rng) is None  # longer than the cap: move on
