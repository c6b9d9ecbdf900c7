"""Runs a call along a plan of deployments — one attempt loop for unary calls and streams.

Circuit breakers and per-deployment limits decide who may be called; each attempt is bounded
(attempt timeout, caller's deadline); retryable failures are retried with backoff, others fall
back to the next deployment or end the call at once. A stream is attempted until its first
event arrives and is then handed back *committed* (`CommittedStream`): first event in hand,
deadline attached, owning its idle timer, its in-flight count, the success/failure record of its
deployment and the rule that a failure after content ends the stream UNAVAILABLE. The caller
only iterates.

Every attempt, skipped ones included, is recorded for the response's `attempts` and the call's
`CallOutcome`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import grpc

from ..config import RetrySettings
from ..domain import Attempt, AttemptOutcome, ChatDelta, ProviderStreamEvent
from ..errors import (
    GatewayError,
    Reason,
    all_deployments_unavailable,
    attempt_timeout,
    deadline_exceeded,
    stream_ended_early,
)
from ..outcome import CallOutcome
from .context import CallContext
from .deployment_state import DeploymentStates
from .idle import IdleTimeout
from .resolver import Deployment
from .retry import retry_delay

T = TypeVar("T")
_DEADLINE_SLACK_S = 0.005
# Failures that say the deployment is unhealthy (count for its breaker). Other provider answers
# (rejections, unknown model) show a working deployment and count as successes.
_UNHEALTHY_REASONS = frozenset({Reason.PROVIDER_AUTH_FAILED, Reason.PROVIDER_BAD_RESPONSE, Reason.PROVIDER_TIMEOUT})


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
    """The attempts of one call, in order, mirrored into the call's outcome as they are added."""

    outcome: CallOutcome
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
                error.reason.value if error else reason,
                status,
            )
        )
        self.outcome.attempts = tuple(self.attempts)

    def summary(self) -> str:
        """`provider/model:REASON,...` for error metadata."""
        return ",".join(f"{a.provider}/{a.model}:{a.error_reason or a.outcome.value}" for a in self.attempts)


@dataclass(frozen=True, slots=True)
class Committed(Generic[T]):
    """A unary call's answer: the result, the deployment that gave it and every attempt made."""

    result: T
    deployment: Deployment
    attempts: tuple[Attempt, ...]


# An attempt: (deployment, seconds it may take) -> the result (unary) or the opened stream.
Start = Callable[[Deployment, float], Awaitable[T]]


class Executor:
    """Attempts calls along a plan (see module docstring).

    Args:
        states: live per-deployment state (breakers, limits, in flight, latency averages).
        settings: retry policy and bounds.
        rng: randomness for backoff jitter (seedable in tests).
    """

    def __init__(self, states: DeploymentStates, settings: ExecutorSettings, rng: random.Random | None = None) -> None:
        self.states = states
        self._settings = settings
        self._rng = rng or random.Random()

    # --- one bounded wait ------------------------------------------------------------------------

    async def bounded(self, ctx: CallContext, deployment: Deployment, awaitable: Awaitable[T], limit_s: float) -> T:
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
            raise wait_failed(ctx, deployment, limit_s, stalled=False, exc=exc) from None

    # --- the attempt loop ------------------------------------------------------------------------

    async def run(self, plan: Sequence[Deployment], ctx: CallContext, tokens: int, call: Start[T]) -> Committed[T]:
        """Runs a unary call: the first deployment (and retry) that answers wins.

        Args:
            plan: deployments in the order to try.
            tokens: estimated tokens of the call, for per-deployment TPM limits.
            call: `(deployment, timeout_s) -> awaitable result`.
        Raises:
            GatewayError: a non-fallback error at once; otherwise the last error once the plan is
                exhausted (metadata `attempts` lists them).
        """
        log = AttemptLog(ctx.outcome)
        result, deployment, started, _ = await self._attempt(plan, ctx, tokens, call, log)
        self._succeeded(deployment, started, log, ttft_ms=None, ctx=ctx)
        self._release(deployment)
        return Committed(result, deployment, tuple(log.attempts))

    async def stream(
        self,
        plan: Sequence[Deployment],
        ctx: CallContext,
        tokens: int,
        start: Callable[[Deployment, float], AsyncIterator[ProviderStreamEvent]],
    ) -> CommittedStream:
        """Opens a stream: retries and fallbacks are allowed until its first event arrives.

        Args:
            start: `(deployment, timeout_s) -> upstream events` (`ChatDelta`s, then one
                `ProviderStreamEnd`).
        Raises:
            GatewayError: as `run` (metadata `chunks_sent` "0").
        """
        log = AttemptLog(ctx.outcome)

        async def first_event(deployment: Deployment, timeout_s: float) -> _Opened:
            upstream = start(deployment, timeout_s)
            try:
                return _Opened(await anext(upstream), upstream)
            except StopAsyncIteration:
                await upstream.aclose()  # type: ignore[attr-defined]
                raise stream_ended_early(deployment.provider.name, deployment.provider_model, 0) from None
            except BaseException:
                await upstream.aclose()  # type: ignore[attr-defined]
                raise

        try:
            opened, deployment, started, trial = await self._attempt(plan, ctx, tokens, first_event, log)
        except GatewayError as error:
            raise error.with_metadata(chunks_sent="0") from None
        ttft_ms = (time.perf_counter() - started) * 1000.0
        ctx.outcome.ttft_ms = ttft_ms
        return CommittedStream(self, ctx, deployment, opened.first, opened.rest, log, started, ttft_ms, trial)

    async def _attempt(
        self,
        plan: Sequence[Deployment],
        ctx: CallContext,
        tokens: int,
        start: Start[T],
        log: AttemptLog,
    ) -> tuple[T, Deployment, float, bool]:
        """The one attempt loop: returns the first result, its deployment (still counted in
        flight: the caller releases it), the perf_counter start of the winning attempt and
        whether it was a half-open breaker trial."""
        last: GatewayError | None = None
        for deployment in plan:
            for attempt in range(self._settings.retry.max_attempts):
                trial = self._admit(deployment, tokens, log)
                if trial is None:
                    break
                ctx.outcome.resolve(deployment.provider.name, deployment.provider_model)
                state = self.states.get(deployment)
                started = time.perf_counter()
                state.in_flight += 1
                try:
                    budget = self._budget(ctx)
                    result = await self.bounded(ctx, deployment, start(deployment, budget), budget)
                except GatewayError as error:
                    state.in_flight -= 1
                    self._failed(deployment, error, started, log, ctx)
                    if error.code is grpc.StatusCode.DEADLINE_EXCEEDED or not error.fallback:
                        raise error.with_metadata(attempts=log.summary()) from None
                    last = error
                    if await self._pause_before_retry(ctx, attempt, error):
                        continue
                    break
                except BaseException:  # cancelled: no outcome to record, but a trial slot to give back
                    state.in_flight -= 1
                    if trial:
                        self.states.release_trial(deployment)
                    raise
                return result, deployment, started, trial
        raise self._exhausted(last, plan, log)

    # --- bookkeeping -----------------------------------------------------------------------------

    def _budget(self, ctx: CallContext) -> float:
        return min(ctx.deadline - asyncio.get_running_loop().time(), self._settings.attempt_timeout_s)

    def _admit(self, deployment: Deployment, tokens: int, log: AttemptLog) -> bool | None:
        """Whether `deployment` may be called now: None (skipped, and logged) or whether the call
        is a half-open breaker trial."""
        trial = self.states.try_acquire_trial(deployment)
        if trial is None:
            log.add(deployment, AttemptOutcome.SKIPPED, None, reason=Reason.CIRCUIT_OPEN.value)
            return None
        if not self.states.get(deployment).within_limits(deployment, tokens, self.states.clock()):
            if trial:
                self.states.release_trial(deployment)
            log.add(deployment, AttemptOutcome.SKIPPED, None, reason="DEPLOYMENT_RATE_LIMITED")
            return None
        return trial

    def _release(self, deployment: Deployment) -> None:
        self.states.get(deployment).in_flight -= 1

    def _failed(
        self, deployment: Deployment, error: GatewayError, started: float, log: AttemptLog, ctx: CallContext
    ) -> None:
        log.add(deployment, AttemptOutcome.ERROR, started, error)
        self.states.record(deployment, success=not counts_against_breaker(error))

    def _succeeded(
        self, deployment: Deployment, started: float, log: AttemptLog, ttft_ms: float | None, ctx: CallContext
    ) -> None:
        log.add(deployment, AttemptOutcome.SUCCESS, started)
        self.states.record(deployment, success=True)
        self.states.get(deployment).observe_latency(log.attempts[-1].latency_ms, ttft_ms)

    async def _pause_before_retry(self, ctx: CallContext, attempt: int, error: GatewayError) -> bool:
        """Waits before retrying the same deployment; False when it should move on instead."""
        if not error.retryable or attempt + 1 >= self._settings.retry.max_attempts:
            return False
        delay = retry_delay(self._settings.retry, attempt, error.retry_after_s, self._rng)
        if delay is None or asyncio.get_running_loop().time() + delay >= ctx.deadline:
            return False
        await asyncio.sleep(delay)
        return True

    def _exhausted(self, last: GatewayError | None, plan: Sequence[Deployment], log: AttemptLog) -> GatewayError:
        if last is None:
            first = plan[0]
            last = all_deployments_unavailable(
                first.provider.name, first.provider_model, self._settings.breaker_cooldown_s
            )
        return last.with_metadata(attempts=log.summary())


@dataclass(frozen=True, slots=True)
class _Opened:
    first: ProviderStreamEvent
    rest: AsyncIterator[ProviderStreamEvent]


def wait_failed(
    ctx: CallContext, deployment: Deployment, limit_s: float, *, stalled: bool, exc: Exception
) -> GatewayError:
    """A bounded wait's failure as the call's error (deadline, attempt timeout or the adapter's)."""
    past_deadline = asyncio.get_running_loop().time() >= ctx.deadline - _DEADLINE_SLACK_S
    provider, model = deployment.provider.name, deployment.provider_model
    if isinstance(exc, GatewayError):
        if exc.metadata.get("failure") == "timeout" and past_deadline:
            return deadline_exceeded(provider, model, limit_s)
        return exc.with_metadata(provider=provider, model=model)
    if past_deadline:
        return deadline_exceeded(provider, model, limit_s)
    return attempt_timeout(provider, model, limit_s, stalled=stalled)


class CommittedStream:
    """A stream whose first event arrived: iterate it once for every upstream event (`ChatDelta`s,
    then one `ProviderStreamEnd`), first event included.

    It owns, until it ends: the idle timer (`stream_idle_timeout_s` between events, never past
    the deadline), the deployment's in-flight count, the breaker/latency record of the outcome,
    and the upstream iterator (closed at the end). A failure raises GatewayError with provider,
    model, `chunks_sent` and `attempts` metadata — UNAVAILABLE once content was sent (the client
    cannot be answered by another deployment any more), DEADLINE_EXCEEDED at the deadline. An
    upstream that ends without its end event raises PROVIDER_BAD_RESPONSE. Call `aclose()` in a
    `finally` (idempotent): a consumer that stops early releases everything there.

    A plain async iterator (one coroutine per event, no generator frame in between: the per-event
    cost is what every streamed chunk pays, bench/INSTRUCTIONS.md).

    Attributes:
        deployment: the deployment serving the stream.
        ttft_ms: time from the winning attempt's start to its first event, ms.
    """

    __slots__ = (
        "_chunks_sent",
        "_ctx",
        "_executor",
        "_first",
        "_idle",
        "_log",
        "_next",
        "_open",
        "_recorded",
        "_rest",
        "_started",
        "_trial",
        "deployment",
        "ttft_ms",
    )

    def __init__(
        self,
        executor: Executor,
        ctx: CallContext,
        deployment: Deployment,
        first: ProviderStreamEvent,
        rest: AsyncIterator[ProviderStreamEvent],
        log: AttemptLog,
        started: float,
        ttft_ms: float,
        trial: bool = False,
    ) -> None:
        self.deployment = deployment
        self.ttft_ms = ttft_ms
        self._executor = executor
        self._ctx = ctx
        self._first: ProviderStreamEvent | None = first
        self._rest = rest
        self._next = rest.__anext__
        self._log = log
        self._started = started
        self._chunks_sent = 0
        self._open = True
        self._recorded = False
        self._trial = trial
        self._idle = IdleTimeout(executor._settings.stream_idle_timeout_s, ctx.deadline)

    @property
    def attempts(self) -> tuple[Attempt, ...]:
        """Every attempt of the call so far (the successful one once the end event arrived)."""
        return tuple(self._log.attempts)

    def __aiter__(self) -> CommittedStream:
        return self

    async def __anext__(self) -> ProviderStreamEvent:
        if self._recorded:  # the end event was returned, or the stream failed
            await self.aclose()
            raise StopAsyncIteration
        event = self._first
        if event is not None:
            self._first = None
        else:
            try:
                event = await self._idle.wait(self._next())
            except StopAsyncIteration:
                error = stream_ended_early(
                    self.deployment.provider.name, self.deployment.provider_model, self._chunks_sent
                )
                raise await self._failure(error) from None
            except (TimeoutError, GatewayError) as exc:
                limit_s = self._executor._settings.stream_idle_timeout_s
                error = wait_failed(self._ctx, self.deployment, limit_s, stalled=True, exc=exc)
                raise await self._failure(error) from None
        if isinstance(event, ChatDelta):
            self._chunks_sent += 1
        else:
            self._recorded = True
            self._executor._succeeded(self.deployment, self._started, self._log, self.ttft_ms, self._ctx)
        return event

    async def _failure(self, error: GatewayError) -> GatewayError:
        """Records a failure after the stream was committed and closes it; returns the error the
        client gets."""
        self._recorded = True
        self._executor._failed(self.deployment, error, self._started, self._log, self._ctx)
        if self._chunks_sent and error.code is not grpc.StatusCode.DEADLINE_EXCEEDED:
            error = error.with_code(grpc.StatusCode.UNAVAILABLE)  # content reached the client: no retry
        await self.aclose()
        return error.with_metadata(
            provider=self.deployment.provider.name,
            model=self.deployment.provider_model,
            chunks_sent=str(self._chunks_sent),
            attempts=self._log.summary(),
        )

    async def aclose(self) -> None:
        """Ends the stream (after its end, or early): releases the deployment's in-flight count,
        stops the idle timer and closes the upstream. Idempotent."""
        if not self._open:
            return
        self._open = False
        self._idle.close()
        self._executor._release(self.deployment)
        if not self._recorded and self._trial:
            # Left early by the consumer: the deployment answered, which is what a trial asks.
            self._executor.states.record(self.deployment, success=True)
        self._recorded = True
        await self._rest.aclose()  # type: ignore[attr-defined]
