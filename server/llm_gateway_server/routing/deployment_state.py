"""Live per-deployment state: circuit breaker, latency and time-to-first-token moving averages,
calls in flight, and per-deployment requests/tokens-per-minute windows.

In memory, per process (shared state across replicas arrives with the Redis backends).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from ..config import BreakerSettings
from .breaker import BreakerState, CircuitBreaker
from .resolver import Deployment

log = structlog.get_logger(__name__)

EWMA_ALPHA = 0.3  # weight of the newest sample in the latency moving averages
_MINUTE_S = 60.0


@dataclass
class DeploymentState:
    """What the router knows about one deployment right now."""

    breaker: CircuitBreaker
    latency_ms: float | None = None
    ttft_ms: float | None = None
    in_flight: int = 0
    _requests: deque[float] = field(default_factory=deque)
    _tokens: deque[tuple[float, int]] = field(default_factory=deque)

    def observe_latency(self, latency_ms: float, ttft_ms: float | None = None) -> None:
        """Updates the moving averages (ms)."""
        self.latency_ms = (
            latency_ms if self.latency_ms is None else self.latency_ms + EWMA_ALPHA * (latency_ms - self.latency_ms)
        )
        if ttft_ms is not None:
            self.ttft_ms = ttft_ms if self.ttft_ms is None else self.ttft_ms + EWMA_ALPHA * (ttft_ms - self.ttft_ms)

    def within_limits(self, deployment: Deployment, tokens: int, now: float) -> bool:
        """Whether one more call of `tokens` fits the deployment's RPM/TPM; reserves it if so."""
        while self._requests and now - self._requests[0] >= _MINUTE_S:
            self._requests.popleft()
        while self._tokens and now - self._tokens[0][0] >= _MINUTE_S:
            self._tokens.popleft()
        if deployment.rpm is not None and len(self._requests) >= deployment.rpm:
            return False
        if deployment.tpm is not None and sum(t for _, t in self._tokens) + tokens > deployment.tpm:
            return False
        self._requests.append(now)
        self._tokens.append((now, tokens))
        return True


BreakerListener = Callable[[Deployment, BreakerState], None]


class DeploymentStates:
    """State per deployment key (`provider/model`), created on first use.

    Args:
        breaker: the breaker policy for every deployment.
        on_breaker_change: called with the deployment and its new state on every transition
            (health and logs subscribe to it).
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        breaker: BreakerSettings,
        on_breaker_change: BreakerListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._breaker_settings = breaker
        self._states: dict[str, DeploymentState] = {}
        self._listeners: list[BreakerListener] = [on_breaker_change] if on_breaker_change else []
        self._last: dict[str, BreakerState] = {}
        self.clock = clock

    def subscribe(self, listener: BreakerListener) -> None:
        """Adds a breaker-transition listener."""
        self._listeners.append(listener)

    def get(self, deployment: Deployment) -> DeploymentState:
        """The state of `deployment` (created closed on first use)."""
        state = self._states.get(deployment.key)
        if state is None:
            state = self._states[deployment.key] = DeploymentState(CircuitBreaker(self._breaker_settings))
        return state

    def breaker_state(self, key: str) -> BreakerState:
        """Breaker state by deployment key (closed for a deployment never called)."""
        state = self._states.get(key)
        return state.breaker.state(self.clock()) if state else BreakerState.CLOSED

    def try_acquire(self, deployment: Deployment) -> bool:
        """Whether the deployment's breaker admits a call now (see CircuitBreaker.try_acquire)."""
        state = self.get(deployment)
        allowed = state.breaker.try_acquire(self.clock())
        self._notify(deployment, state.breaker.state(self.clock()))
        return allowed

    def try_acquire_trial(self, deployment: Deployment) -> bool | None:
        """Like `try_acquire`, telling a half-open trial (True) from a normal admission (False);
        None when the breaker refuses."""
        state = self.get(deployment)
        now = self.clock()
        breaker = state.breaker
        trial = breaker.state(now) is BreakerState.HALF_OPEN
        allowed = breaker.try_acquire(now)
        self._notify(deployment, breaker.state(now))
        return trial if allowed else None

    def release_trial(self, deployment: Deployment) -> None:
        """Returns a half-open trial slot of a call that ended with no outcome."""
        self.get(deployment).breaker.release_trial(self.clock())

    def record(self, deployment: Deployment, success: bool) -> None:
        """Records an outcome that counts for the breaker; notifies on a transition."""
        state = self.get(deployment)
        self._notify(deployment, state.breaker.record(self.clock(), success))

    def _notify(self, deployment: Deployment, new: BreakerState) -> None:
        old = self._last.get(deployment.key, BreakerState.CLOSED)
        if new is old:
            return
        self._last[deployment.key] = new
        log.warning("breaker_transition", deployment=deployment.key, old=old.value, new=new.value)
        for listener in self._listeners:
            listener(deployment, new)
