"""Runs a call along a plan of deployments: circuit breakers and per-deployment limits decide who
may be called, each attempt is bounded (attempt timeout, caller's deadline), retryable failures are
retried with backoff, others fall back to the next deployment or end the call at once.

Every attempt, skipped ones included, is recorded for the response's `attempts`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ..config import RetrySettings
from ..domain import Attempt, AttemptOutcome, ProviderStreamEvent
from ..errors import GatewayError, deadline_exceeded
from .calls import CallContext
from .idle import IdleTimeout
from .resolver import Deployment
from .retry import retry_delay
from .state import DeploymentStates

T = TypeVar("T")
_DEADLINE_SLACK_S = 0.005
# Failures that say the deployment is unhealthy (count for its breaker). Other provider answers
# (rejections, unknown model) show a working deployment and count as successes.
_UNHEALTHY_REASONS = frozenset({"PROVIDER_AUTH_FAILED", "PROVIDER_BAD_RESPONSE", "PROVIDER_TIMEOUT"})


def counts_against_breaker(error: GatewayError) -> bool:
    """Whether `error` is a deployment failure for its circuit breaker."""
    return error.retryable or error.reason in _UNHEALTHY_REASONS


@dataclass(frozen=True, slots=True)
class ExecutorSettings:
    """Retry policy and bounds (seconds) for attempts."""

    retry: RetrySettings
    attempt_timeout_s: float
    stream_idle_timeout_s: float
    breaker_cooldown_s: float


@dataclass
class AttemptLog:
    """The attempts of one call, in order."""

    attempts: list[Attempt] = field(default_factory=list)

    def add(
        self,
        deployment: Deployment,
        outcome: AttemptOutcome,
        started: float | None,
        error: GatewayError | None = None,
        reason: str = "",
    ) -> None:
        """Records one attempt (`started`: perf_counter at its start; None for skipped)."""
        latency = 0.0 if started is None else (time.perf_counter() - started) * 1000.0
        status = int(error.metadata.get("upstream_status", "0") or 0) if error else 0
        self.attempts.append(
            Attempt(
                deployment.provider.name,
                deployment.provider_model,
                outcome,
                latency,
                error.reason if error else reason,
                status,
            )
        )

    def summary(self) -> str:
        """`provider/model:REASON,...` for error metadata."""
        return ",".join(f"{a.provider}/{a.model}:{a.error_reason or a.outcome.value}" for a in self.attempts)


def attempt_timeout(deployment: Deployment, limit_s: float, stalled: bool) -> GatewayError:
    """UNAVAILABLE / PROVIDER_TIMEOUT: an attempt (or a stream between events) took too long."""
    what = "sent nothing for" if stalled else "did not answer within"
    return GatewayError(
        "UNAVAILABLE",
        "PROVIDER_TIMEOUT",
        f"provider {deployment.provider.name!r} {what} {limit_s:.3g}s for model {deployment.provider_model!r}",
        metadata={
            "provider": deployment.provider.name,
            "model": deployment.provider_model,
            "failure": "stalled" if stalled else "timeout",
            "upstream_status": "0",
        },
        retryable=True,
    )


@dataclass
class OpenStream:
    """A stream whose first event arrived: the deployment serving it, that event, the rest of the
    upstream events, and timing (perf_counter start, time to first event in ms)."""

    deployment: Deployment
    first: ProviderStreamEvent
    rest: AsyncIterator[ProviderStreamEvent]
    started: float
    ttft_ms: float


class Executor:
    """Attempts calls along a plan (see module docstring)."""

    def __init__(self, states: DeploymentStates, settings: ExecutorSettings, rng: random.Random | None = None) -> None:
        self.states = states
        self.settings = settings
        self._rng = rng or random.Random()

    async def bounded(
        self,
        ctx: CallContext,
        deployment: Deployment,
        awaitable: Awaitable[T],
        limit_s: float,
        *,
        stalled: bool = False,
    ) -> T:
        """Awaits `awaitable` for at most `limit_s` and never past the caller's deadline.

        Raises:
            GatewayError: DEADLINE_EXCEEDED at the deadline, PROVIDER_TIMEOUT at `limit_s`, or the
                adapter's error with provider/model metadata.
        """
        until = min(ctx.deadline, asyncio.get_running_loop().time() + limit_s)
        try:
            async with asyncio.timeout_at(until):
                return await awaitable
        except (TimeoutError, GatewayError) as exc:
            raise self._wait_failed(ctx, deployment, limit_s, stalled, exc) from None

    async def next_event(
        self, ctx: CallContext, deployment: Deployment, events: AsyncIterator[T], idle: IdleTimeout
    ) -> T:
        """The next event of a committed stream, within the stream's idle timeout (`idle`, one
        timer for the whole stream) and the caller's deadline.

        Raises:
            StopAsyncIteration: the stream ended.
            GatewayError: as `bounded`, PROVIDER_TIMEOUT meaning the stream stalled.
        """
        try:
            return await idle.wait(anext(events))
        except (TimeoutError, GatewayError) as exc:
            raise self._wait_failed(ctx, deployment, self.settings.stream_idle_timeout_s, True, exc) from None

    def _wait_failed(
        self, ctx: CallContext, deployment: Deployment, limit_s: float, stalled: bool, exc: Exception
    ) -> GatewayError:
        """A bounded wait's failure as the call's error (deadline, attempt timeout or the adapter's)."""
        past_deadline = asyncio.get_running_loop().time() >= ctx.deadline - _DEADLINE_SLACK_S
        if isinstance(exc, GatewayError):
            if exc.metadata.get("failure") == "timeout" and past_deadline:
                return deadline_exceeded(deployment.provider.name, deployment.provider_model, limit_s)
            return exc.with_metadata(provider=deployment.provider.name, model=deployment.provider_model)
        if past_deadline:
            return deadline_exceeded(deployment.provider.name, deployment.provider_model, limit_s)
        return attempt_timeout(deployment, limit_s, stalled)

    def _budget(self, ctx: CallContext) -> float:
        return min(ctx.deadline - asyncio.get_running_loop().time(), self.settings.attempt_timeout_s)

    def _admit(self, deployment: Deployment, tokens: int, log: AttemptLog) -> bool:
        if not self.states.try_acquire(deployment):
            log.add(deployment, AttemptOutcome.SKIPPED, None, reason="CIRCUIT_OPEN")
            return False
        if not self.states.get(deployment).within_limits(deployment, tokens, self.states.clock()):
            log.add(deployment, AttemptOutcome.SKIPPED, None, reason="DEPLOYMENT_RATE_LIMITED")
            return False
        return True

    def _failed(self, deployment: Deployment, error: GatewayError, started: float, log: AttemptLog) -> None:
        log.add(deployment, AttemptOutcome.ERROR, started, error)
        self.states.record(deployment, success=not counts_against_breaker(error))

    def succeeded(self, deployment: Deployment, started: float, log: AttemptLog, ttft_ms: float | None = None) -> None:
        """Records a successful attempt (breaker, latency averages, attempt log)."""
        log.add(deployment, AttemptOutcome.SUCCESS, started)
        self.states.record(deployment, success=True)
        self.states.get(deployment).observe_latency(log.attempts[-1].latency_ms, ttft_ms)

    async def _pause_before_retry(self, ctx: CallContext, attempt: int, error: GatewayError) -> bool:
        """Waits before retrying the same deployment; False when it should move on instead."""
        if not error.retryable or attempt + 1 >= self.settings.retry.max_attempts:
            return False
        delay = retry_delay(self.settings.retry, attempt, error.retry_after_s, self._rng)
        if delay is None or asyncio.get_running_loop().time() + delay >= ctx.deadline:
            return False
        await asyncio.sleep(delay)
        return True

    def _exhausted(self, last: GatewayError | None, plan: Sequence[Deployment], log: AttemptLog) -> GatewayError:
        if last is None:
            first = plan[0]
            last = GatewayError(
                "UNAVAILABLE",
                "CIRCUIT_OPEN",
                "every deployment for this model is unavailable (circuit breaker open or deployment limit reached)",
                metadata={"provider": first.provider.name, "model": first.provider_model},
                retry_after_s=self.settings.breaker_cooldown_s,
            )
        return last.with_metadata(attempts=log.summary())

    async def run(
        self,
        plan: Sequence[Deployment],
        ctx: CallContext,
        tokens: int,
        call: Callable[[Deployment, float], Awaitable[T]],
    ) -> tuple[T, Deployment, AttemptLog]:
        """Runs a unary call: the first deployment (and retry) that answers wins.

        Args:
            plan: deployments in the order to try.
            tokens: estimated tokens of the call, for per-deployment TPM limits.
            call: `(deployment, timeout_s) -> awaitable result`.
        Raises:
            GatewayError: a non-fallback error at once; otherwise the last error once the plan is
                exhausted (metadata `attempts` lists them).
        """
        log = AttemptLog()
        last: GatewayError | None = None
        for deployment in plan:
            for attempt in range(self.settings.retry.max_attempts):
                if not self._admit(deployment, tokens, log):
                    break
                state = self.states.get(deployment)
                started = time.perf_counter()
                state.in_flight += 1
                try:
                    budget = self._budget(ctx)
                    result = await self.bounded(ctx, deployment, call(deployment, budget), budget)
                except GatewayError as error:
                    self._failed(deployment, error, started, log)
                    if error.code == "DEADLINE_EXCEEDED" or not error.fallback:
                        raise error.with_metadata(attempts=log.summary()) from None
                    last = error
                    if await self._pause_before_retry(ctx, attempt, error):
                        continue
                    break
                finally:
                    state.in_flight -= 1
                self.succeeded(deployment, started, log)
                return result, deployment, log
        raise self._exhausted(last, plan, log)

    async def open_stream(
        self,
        plan: Sequence[Deployment],
        ctx: CallContext,
        tokens: int,
        start: Callable[[Deployment, float], AsyncIterator[ProviderStreamEvent]],
    ) -> tuple[OpenStream, AttemptLog]:
        """Opens a stream: retries and fallbacks are allowed until the first event arrives.

        Raises:
            GatewayError: as `run`.
        """
        log = AttemptLog()
        last: GatewayError | None = None
        for deployment in plan:
            for attempt in range(self.settings.retry.max_attempts):
                if not self._admit(deployment, tokens, log):
                    break
                started = time.perf_counter()
                budget = self._budget(ctx)
                upstream = start(deployment, budget)
                try:
                    first = await self.bounded(ctx, deployment, anext(upstream), budget)
                except (GatewayError, StopAsyncIteration) as raised:
                    await upstream.aclose()  # type: ignore[attr-defined]
                    error = (
                        raised
                        if isinstance(raised, GatewayError)
                        else GatewayError(
                            "UNAVAILABLE",
                            "PROVIDER_BAD_RESPONSE",
                            "the stream ended before any event",
                            metadata={"provider": deployment.provider.name, "model": deployment.provider_model},
                            retryable=True,
                        )
                    )
                    self._failed(deployment, error, started, log)
                    if error.code == "DEADLINE_EXCEEDED" or not error.fallback:
                        raise error.with_metadata(attempts=log.summary(), chunks_sent="0") from None
                    last = error
                    if await self._pause_before_retry(ctx, attempt, error):
                        continue
                    break
                ttft_ms = (time.perf_counter() - started) * 1000.0
                return OpenStream(deployment, first, upstream, started, ttft_ms), log
        raise self._exhausted(last, plan, log).with_metadata(chunks_sent="0")

    def stream_failed(self, stream: OpenStream, error: GatewayError, log: AttemptLog) -> None:
        """Records a failure after the stream was committed to the client."""
        self._failed(stream.deployment, error, stream.started, log)
