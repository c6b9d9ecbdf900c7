"""Quotas: rate limits and budgets of the call's key and team, checked in one backend call
before the RPC and settled in one after it (one Redis round trip each; `state/base.py`).

Scopes. An authenticated call counts against its key (`keys/{id}`: the key's own limits, else
`rate_limits.default_*`; the key's budget) and, when the key has a team, against the team too
(`teams/{id}`: the team's limits, no defaults; the team's budget). A call without auth counts
against its client address (`peer:{host}`, the defaults, no budget).

Before the call the backend checks and reserves, atomically for every scope: 1 request (rpm),
the token estimate (tpm: input text at ~4 chars/token plus framing, plus `max_output_tokens` or
`rate_limits.output_tokens_reserve`), a stream slot (max_concurrent_streams, streams only) and
the cost estimate (budgets: the same tokens at catalog prices, `routing/pricing.py`). After the
call — unary, stream (including one that fails after content, with the partial usage its outcome
has) or Embed — the reservation is replaced by the outcome's real tokens and cost (0 for cache
hits and for calls that produced no usage) and the stream slot released, cancelled calls
included.

Budgets. A call is admitted while the period's committed spend plus outstanding reservations is
below the limit, and refused once it is at or above. If every call's real cost is at most its
estimate (true when the request sets `max_output_tokens` and the input estimate is not below the
provider's count), the admitted calls' total cost is below `limit + the cost of one call` (the
last one admitted). A call that costs more than its estimate (no `max_output_tokens` and an
answer longer than the output reserve, a fallback to a pricier model) can add its excess, and
the excess of every call in flight when the last one was admitted, on top of that bound.

Unpriced models under a budget (`budgets.unpriced_models`): "allow" (default) lets the call
through with its cost counted as 0 and logs a warning once per model; "refuse" answers
PERMISSION_DENIED / MODEL_UNPRICED.

Refusals: RESOURCE_EXHAUSTED / RATE_LIMIT_EXCEEDED with RetryInfo (until the window resets) and
QuotaFailure; RESOURCE_EXHAUSTED / BUDGET_EXCEEDED with QuotaFailure (subject `keys/{id}` or
`teams/{id}`, the period in its description) and RetryInfo until the period resets (none for a
lifetime budget). Allowed calls carry `x-ratelimit-*` headers (the scope with the least
remaining) and `x-budget-remaining-usd` when budgeted: trailing metadata of a unary call,
initial metadata of a stream (before its first message). When the backend is unreachable the
call goes through (fail-open, default; budgets included: the call's cost reaches the ledger but
not the backend's counters) or is refused UNAVAILABLE / RATE_LIMITER_UNAVAILABLE (fail-closed);
either way it is logged and counted, never a hang.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

import grpc
import structlog

from llm_gateway.v1 import llm_gateway_pb2 as pb

from ..config import BudgetSettings, RateLimitSettings
from ..errors import budget_exceeded, model_unpriced, rate_limit_exceeded, rate_limiter_unavailable
from ..estimates import TOKENS_PER_MESSAGE, estimate_tokens
from ..outcome import CallOutcome
from ..state.base import (
    Admission,
    BackendUnavailableError,
    BudgetQuota,
    QuotaBackend,
    QuotaRequest,
    ScopeQuota,
)
from ..telemetry.metrics import Metrics
from ..tenancy.records import Budget, BudgetPeriod, SpendSeed, Tenant, nano_to_usd, period_bounds, usd_to_nano
from ..transport.call_record import CallRecord, current_call
from ..transport.status import abort
from .base import GatewayInterceptor, StreamBehavior, UnaryBehavior

log = structlog.get_logger(__name__)
_LIMIT_UNITS = {"requests": "requests per minute", "tokens": "tokens per minute", "streams": "concurrent streams"}
CostEstimate = Callable[[str, int, int], int | None]
"""(model, input tokens, output tokens) → the call's cost estimate in nano-USD, or None when the
model has no price (`routing.pricing.CostEstimator`)."""


def peer_scope(peer: str) -> str:
    """`ipv4:127.0.0.1:5000` → `peer:127.0.0.1` (the client address without its port)."""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else peer
    return f"peer:{host}"


def request_token_estimate(request: object, output_reserve: int) -> tuple[int, int]:
    """(input, output) tokens a request may use: its text at ~4 chars/token plus framing, and
    its `max_output_tokens` (or `output_reserve` when it sets none). Embed: the inputs, no
    output. Other calls: (0, 0)."""
    if isinstance(request, (pb.ChatRequest, pb.ChatStreamRequest)):
        text = sum(len(p.text) for m in request.messages for p in m.content)
        generation = request.generation
        output = generation.max_output_tokens if generation.HasField("max_output_tokens") else output_reserve
        return estimate_tokens(text) + TOKENS_PER_MESSAGE * len(request.messages), max(output, 0)
    if isinstance(request, pb.EmbedRequest):
        return sum(estimate_tokens(len(t)) for t in request.inputs), 0
    return 0, 0


def estimate_request_tokens(request: object, output_reserve: int) -> int:
    """Input + output tokens of `request_token_estimate`."""
    input_tokens, output_tokens = request_token_estimate(request, output_reserve)
    return input_tokens + output_tokens


def settled_usage(outcome: CallOutcome) -> tuple[int, int]:
    """(tokens, nano-USD) a finished call is charged: its usage and cost (a failed stream's
    partial ones when its outcome has them); (0, 0) for a cache hit or a call without usage."""
    if outcome.cache_hit or outcome.usage is None:
        return 0, 0
    cost = usd_to_nano(outcome.cost.total_usd) if outcome.cost is not None else 0
    return outcome.usage.input_tokens + outcome.usage.output_tokens, cost


def _seed(seed: SpendSeed | None, start: datetime | None) -> int:
    """The seed's spend if it is for the period starting at `start`, else 0."""
    return seed.spend_nano_usd if seed is not None and seed.period_start == start else 0


class QuotaInterceptor(GatewayInterceptor):
    """Enforces rate limits and budgets with a `QuotaBackend` (in memory or Redis); see the
    module docstring.

    Args:
        backend: the counters.
        settings: default limits, the output-tokens reserve and the failure policy.
        budgets: the unpriced-models policy.
        estimate_cost: (model, input tokens, output tokens) → nano-USD or None (unpriced).
        metrics: refusals and backend failures are counted here (None: not counted).
        stream_max_age_s: how long a stream slot may live (bounds leaks from crashed processes).
        clock: wall-clock time, unix seconds (windows and budget periods).
    """

    def __init__(
        self,
        backend: QuotaBackend,
        settings: RateLimitSettings,
        budgets: BudgetSettings,
        estimate_cost: CostEstimate,
        metrics: Metrics | None,
        stream_max_age_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self._backend = backend
        self._settings = settings
        self._refuse_unpriced = budgets.unpriced_models == "refuse"
        self._estimate_cost = estimate_cost
        self._metrics = metrics
        self._stream_max_age_s = stream_max_age_s
        self._clock = clock
        self._periods: dict[BudgetPeriod, tuple[float, float, datetime | None, datetime | None]] = {}
        self._warned_unpriced: set[str] = set()
        self._settling: set[asyncio.Task[None]] = set()
        self._stream_ids = 0
        self._stream_prefix = f"{os.getpid()}-{time.time_ns():x}"

    def tenant(self, record: CallRecord) -> Tenant | None:
        """Who the call is for: the key cache's `record.tenant` (None without auth)."""
        return record.tenant

    # --- what a call counts against --------------------------------------------------------

    def _period(self, period: BudgetPeriod, now: float) -> tuple[datetime | None, datetime | None]:
        """The period containing `now`, remembered until it ends."""
        known = self._periods.get(period)
        if known is not None and known[0] <= now < known[1]:
            return known[2], known[3]
        start, end = period_bounds(period, datetime.fromtimestamp(now, UTC))
        first, last = (start.timestamp(), end.timestamp()) if start and end else (float("-inf"), float("inf"))
        self._periods[period] = (first, last, start, end)
        return start, end

    def _budget(self, budget: Budget | None, seed: SpendSeed | None, now: float) -> BudgetQuota | None:
        if budget is None:
            return None
        start, end = self._period(budget.period, now)
        return BudgetQuota(
            budget.limit_nano_usd,
            budget.period,
            None if start is None else int(start.timestamp()),
            None if end is None else int(end.timestamp()),
            _seed(seed, start),
        )

    def _scopes(self, record: CallRecord, now: float) -> tuple[str, tuple[ScopeQuota, ...]]:
        """(hash tag, scopes that check something) of the call."""
        s = self._settings
        tenant = self.tenant(record)
        if tenant is None:
            # Without a tenant record an authenticated key still counts on its own (never in the
            # peer's scope), with the defaults.
            name = f"keys/{record.key_id}" if record.key_id else peer_scope(record.peer)
            only = ScopeQuota(name, s.default_rpm, s.default_tpm, s.default_max_concurrent_streams)
            return name, () if only.empty else (only,)
        key, limits = tenant.key, tenant.key.limits
        scopes = [
            ScopeQuota(
                key.name,
                s.default_rpm if limits.rpm is None else limits.rpm,
                s.default_tpm if limits.tpm is None else limits.tpm,
                s.default_max_concurrent_streams
                if limits.max_concurrent_streams is None
                else limits.max_concurrent_streams,
                self._budget(key.budget, tenant.key_spend, now),
            )
        ]
        team = tenant.team
        if team is not None:
            t = team.limits
            budget = self._budget(team.budget, tenant.team_spend, now)
            scopes.append(ScopeQuota(team.name, t.rpm, t.tpm, t.max_concurrent_streams, budget))
        return key.team_name or key.name, tuple(q for q in scopes if not q.empty)

    async def _cost(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        record: CallRecord,
        request: Any,
        scopes: tuple[ScopeQuota, ...],
        tokens: tuple[int, int],
    ) -> int:
        """The call's cost estimate, nano-USD (0 for an unpriced model that is allowed).

        Raises:
            (through `context.abort`) PERMISSION_DENIED / MODEL_UNPRICED for an unpriced model
            under `unpriced_models: refuse`.
        """
        model = request.model if isinstance(request, (pb.ChatRequest, pb.ChatStreamRequest, pb.EmbedRequest)) else ""
        if not model:
            return 0
        estimate = self._estimate_cost(model, *tokens)
        if estimate is not None:
            return estimate
        subject = next(q.scope for q in scopes if q.budget is not None)
        if self._refuse_unpriced:
            if self._metrics is not None:
                self._metrics.rate_limited.labels("unpriced").inc()
            await abort(context, model_unpriced(model, subject), record.request_id)
        if model not in self._warned_unpriced and len(self._warned_unpriced) < 1024:
            self._warned_unpriced.add(model)
            log.warning("budget_unpriced_model", model=model, subject=subject, counted_usd=0)
        return 0

    # --- before and after ------------------------------------------------------------------

    async def _admit(
        self, context: grpc.aio.ServicerContext[Any, Any], request: Any, stream: bool
    ) -> tuple[CallRecord, Admission | None, tuple[tuple[str, str], ...]]:
        """Checks and reserves the call's quotas (one backend call).

        Returns:
            The call record, the admission (None when nothing is limited, or when the backend
            failed open: nothing reserved, nothing to settle) and the headers to send with the
            answer.
        Raises:
            (through `context.abort`) RESOURCE_EXHAUSTED over a limit or budget; PERMISSION_DENIED
            for a refused unpriced model; UNAVAILABLE when the backend failed closed.
        """
        record = current_call.get()
        assert record is not None, "the observability interceptor runs first"
        now = self._clock()
        tag, scopes = self._scopes(record, now)
        if not scopes:
            return record, None, ()
        tokens = request_token_estimate(request, self._settings.output_tokens_reserve)
        cost = 0
        if any(q.budget is not None for q in scopes):
            cost = await self._cost(context, record, request, scopes, tokens)
        stream_id = ""
        if stream and any(q.max_streams is not None for q in scopes):
            self._stream_ids += 1
            stream_id = f"{self._stream_prefix}-{self._stream_ids}"
        quota = QuotaRequest(tag, scopes, tokens[0] + tokens[1], cost, now, stream_id, self._stream_max_age_s)
        try:
            admission = await self._backend.admit(quota)
        except BackendUnavailableError as exc:
            await self._backend_failed(context, record, exc)
            return record, None, ()
        if not admission.allowed:
            await self._reject(context, record, admission)
        if cost and self._metrics is not None:
            self._note_budgets(admission)
        return record, admission, self._headers(admission)

    def _note_budgets(self, admission: Admission) -> None:
        """Budget gauges (`llm_gateway_budget_spend_usd` / `_limit_usd`) from the counters the
        admission saw."""
        assert self._metrics is not None
        for quota, count in zip(admission.request.scopes, admission.counts, strict=True):
            if quota.budget is not None:
                self._metrics.budget_spend.labels(quota.scope).set(nano_to_usd(count.spend_nano_usd))
                self._metrics.budget_limit.labels(quota.scope).set(nano_to_usd(quota.budget.limit_nano_usd))

    async def _backend_failed(
        self, context: grpc.aio.ServicerContext[Any, Any], record: CallRecord, exc: BackendUnavailableError
    ) -> None:
        action = "fail_open" if self._settings.fail_open else "fail_closed"
        log.warning("rate_limit_backend_unavailable", action=action, error=str(exc), request_id=record.request_id)
        if self._metrics is not None:
            self._metrics.backend_errors.labels("rate_limit", action).inc()
        if not self._settings.fail_open:
            await abort(context, rate_limiter_unavailable(), record.request_id)

    async def _reject(
        self, context: grpc.aio.ServicerContext[Any, Any], record: CallRecord, admission: Admission
    ) -> NoReturn:
        scope = admission.request.scopes[admission.refused]
        found = admission.counts[admission.refused]
        limit = admission.exceeded
        if self._metrics is not None:
            self._metrics.rate_limited.labels(limit).inc()
        if limit == "budget":
            budget = scope.budget
            assert budget is not None
            reset_s = None if budget.end_s is None else max(budget.end_s - admission.request.now, 0.0)
            error = budget_exceeded(
                scope.scope,
                nano_to_usd(budget.limit_nano_usd),
                nano_to_usd(found.spend_nano_usd),
                budget.period.value,
                reset_s,
            )
        else:
            value = {"requests": scope.rpm, "tokens": scope.tpm, "streams": scope.max_streams}[limit]
            assert value is not None
            reset_s = 1.0 if limit == "streams" else admission.reset_s
            error = rate_limit_exceeded(scope.scope, limit, value, _LIMIT_UNITS[limit], reset_s)
        await abort(context, error, record.request_id)

    @staticmethod
    def _headers(admission: Admission) -> tuple[tuple[str, str], ...]:
        """`x-ratelimit-*` of the scope with the least remaining of each limit, and
        `x-budget-remaining-usd` (the least remaining budget) when budgeted."""
        requests: tuple[int, int] | None = None
        tokens: tuple[int, int] | None = None
        budget: int | None = None
        for scope, count in zip(admission.request.scopes, admission.counts, strict=True):
            if scope.rpm is not None and (requests is None or scope.rpm - count.requests < requests[1]):
                requests = scope.rpm, scope.rpm - count.requests
            if scope.tpm is not None and (tokens is None or scope.tpm - count.tokens < tokens[1]):
                tokens = scope.tpm, scope.tpm - count.tokens
            if scope.budget is not None:
                left = scope.budget.limit_nano_usd - count.spend_nano_usd
                budget = left if budget is None else min(budget, left)
        headers: list[tuple[str, str]] = []
        reset = f"{admission.reset_s:.3f}s"
        if requests is not None:
            headers += [
                ("x-ratelimit-limit-requests", str(requests[0])),
                ("x-ratelimit-remaining-requests", str(max(requests[1], 0))),
                ("x-ratelimit-reset-requests", reset),
            ]
        if tokens is not None:
            headers += [
                ("x-ratelimit-limit-tokens", str(tokens[0])),
                ("x-ratelimit-remaining-tokens", str(max(tokens[1], 0))),
                ("x-ratelimit-reset-tokens", reset),
            ]
        if budget is not None:
            headers.append(("x-budget-remaining-usd", f"{nano_to_usd(max(budget, 0)):.9f}"))
        return tuple(headers)

    async def _settle(self, record: CallRecord, admission: Admission) -> None:
        """Replaces the reservation by the call's real tokens and cost and releases its stream
        slot; a cancelled call settles in a task of its own (a second cancellation cannot cut
        it short)."""
        tokens, cost = settled_usage(record.outcome)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            settling = asyncio.ensure_future(self._settle_now(record, admission, tokens, cost))
            self._settling.add(settling)
            settling.add_done_callback(self._settling.discard)
            return
        await self._settle_now(record, admission, tokens, cost)

    async def _settle_now(self, record: CallRecord, admission: Admission, tokens: int, cost: int) -> None:
        try:
            await self._backend.settle(admission, tokens, cost)
        except BackendUnavailableError as exc:
            log.warning("rate_limit_reconcile_failed", error=str(exc), request_id=record.request_id)
            if self._metrics is not None:
                self._metrics.backend_errors.labels("rate_limit", "reconcile_skipped").inc()

    # --- the two call shapes ---------------------------------------------------------------

    async def unary(
        self, inner: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        record, admission, headers = await self._admit(context, request, stream=False)
        if admission is None:
            return await inner(request, context)
        try:
            response = await inner(request, context)
            if headers:  # trailers travel with the status: no extra HTTP/2 frame (bench/NOTES.md)
                context.set_trailing_metadata((*(context.trailing_metadata() or ()), *headers))
            return response
        finally:
            await self._settle(record, admission)

    async def stream(
        self, inner: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        record, admission, headers = await self._admit(context, request, stream=True)
        if admission is None:
            async for message in inner(request, context):
                yield message
            return
        try:
            if headers:  # before the first message, so a client can read them before any content
                await context.send_initial_metadata(headers)
            async for message in inner(request, context):
                yield message
        finally:
            await self._settle(record, admission)

    async def aclose(self) -> None:
        """Waits for settlements still running (of cancelled calls)."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
