"""The outermost interceptor: assigns the request id and the call record, then writes one
structured log line, the metrics and (with tracing on) the span of every RPC (method, peer, key
id, model, provider, status, latency, time to first token, time per output token, tokens, cost,
cache, attempts, retries, gateway overhead, calls in flight).

Everything it reports comes from the call's typed `CallOutcome` (filled by the router, the
executor, the cache and `transport.status.abort`), not from the protobuf messages; only prompt
and answer text (with `log_content`), and the finish reason and provider response id (for the
span), are read from the messages.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from llm_gateway.v1 import llm_gateway_pb2 as pb

from ..domain import Attempt, AttemptOutcome
from ..telemetry.metrics import ANONYMOUS_KEY, OTHER_MODEL, UNRESOLVED_MODEL, KnownModel, Metrics
from ..telemetry.tracing import RpcTracing, finish_reason_name
from ..transport.call_record import CallRecord, current_call, request_id_from
from .base import GatewayInterceptor, StreamBehavior, UnaryBehavior, method_name

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = structlog.get_logger("llm_gateway.rpc")


def cancelled_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """CANCELLED, or DEADLINE_EXCEEDED when the client's deadline is what ended the call."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


class ObservabilityInterceptor(GatewayInterceptor):
    """Logs and measures every RPC; `log_content` adds prompt and answer text to the log line.

    Args:
        metrics: where to count (None: metrics off).
        log_content: add prompt and answer text to the log line.
        known_model: `(provider, provider model) -> bool`: whether that model may be a `model`
            label value (a model the configuration names); others are counted as "other", so
            passthrough names chosen by clients create no series. Default: every model.
        tracing: one OpenTelemetry span per RPC (None: tracing off).
    """

    def __init__(
        self,
        metrics: Metrics | None,
        log_content: bool = False,
        known_model: KnownModel | None = None,
        tracing: RpcTracing | None = None,
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._log_content = log_content
        self._known_model = known_model or _any_model
        self._tracing = tracing

    def _begin(self, context: grpc.aio.ServicerContext[Any, Any], method: str, request: Any) -> _Call:
        metadata = context.invocation_metadata()
        record = CallRecord(request_id=request_id_from(metadata), method=method, peer=context.peer() or "")
        current_call.set(record)
        span = self._tracing.start(method, request, metadata) if self._tracing is not None else None
        if self._metrics is not None:
            self._metrics.child(self._metrics.in_flight, method_name(method)).inc()
        return _Call(record, time.perf_counter(), span)

    async def unary(
        self, inner: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        call = self._begin(context, method, request)
        try:
            response = await inner(request, context)
            if isinstance(response, pb.ChatResponse):
                if self._log_content:
                    call.answer = "".join(p.text for p in response.message.content)
                if call.span is not None:  # only the span reads them
                    call.finish_reason = finish_reason_name(response.finish_reason)
                    call.response_id = response.provider_response_id
            return response
        except asyncio.CancelledError:
            call.record.outcome.code = cancelled_code(context)
            raise
        finally:
            self._finish(call, request)

    async def stream(
        self, inner: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        call = self._begin(context, method, request)
        pieces: list[str] = []
        last: Any = None
        try:
            async for message in inner(request, context):
                if call.ttft_s is None:
                    call.ttft_s = time.perf_counter() - call.started
                if self._log_content and message.WhichOneof("event") == "delta":
                    pieces.append(message.delta.text)
                last = message
                yield message
            if call.span is not None and last is not None and last.WhichOneof("event") == "final":
                call.finish_reason = finish_reason_name(last.final.finish_reason)
                call.response_id = last.final.provider_response_id
        except (asyncio.CancelledError, GeneratorExit):
            call.record.outcome.code = cancelled_code(context)
            raise
        finally:
            call.answer = "".join(pieces)
            self._finish(call, request)

    def _finish(self, call: _Call, request: Any) -> None:
        elapsed = time.perf_counter() - call.started
        record = call.record
        outcome = record.outcome
        name = method_name(record.method)
        fields: dict[str, Any] = {
            "request_id": record.request_id,
            "method": name,
            "peer": record.peer,
            "key_id": record.key_id,
            "model": outcome.model or _requested_model(request),
            "provider": outcome.provider,
            "code": outcome.code.name,
            "latency_ms": round(elapsed * 1000.0, 3),
        }
        if outcome.error is not None:
            fields["reason"] = outcome.error.reason.value
            fields["error"] = {k: v for k, v in outcome.error.metadata.items() if k != "request_id"}
        if call.ttft_s is not None:
            fields["ttft_ms"] = round(call.ttft_s * 1000.0, 3)
        if outcome.usage is not None:
            fields.update(
                input_tokens=outcome.usage.input_tokens,
                output_tokens=outcome.usage.output_tokens,
                cost_usd=outcome.cost.total_usd if outcome.cost else 0.0,
                cache_hit=outcome.cache_hit,
                attempts=len(outcome.attempts),
            )
        if self._log_content:
            fields["prompt"] = _prompt_text(request)
            fields["answer"] = call.answer
        log.info("rpc", **fields)
        if self._metrics is not None:
            self._metrics.child(self._metrics.in_flight, name).dec()
            _record_metrics(self._metrics, name, record, elapsed, call.ttft_s, self._known_model)
        if call.span is not None:
            RpcTracing.end(call.span, record, call.finish_reason, call.response_id)


@dataclass(slots=True)
class _Call:
    """One RPC while it runs: its record, start (perf_counter), span, and what its messages said."""

    record: CallRecord
    started: float
    span: Span | None
    ttft_s: float | None = None
    answer: str = ""
    finish_reason: str = ""
    response_id: str = ""


def _any_model(provider: str, model: str) -> bool:
    return True


def _retries(attempts: tuple[Attempt, ...]) -> int:
    """Attempts made right after an attempt on the same deployment (skipped ones are no retry)."""
    return sum(
        1
        for before, after in itertools.pairwise(attempts)
        if after.outcome is not AttemptOutcome.SKIPPED
        and (before.provider, before.model) == (after.provider, after.model)
    )


def _record_metrics(
    m: Metrics, name: str, record: CallRecord, elapsed: float, ttft_s: float | None, known_model: KnownModel
) -> None:
    outcome = record.outcome
    provider = outcome.provider or "none"
    if not outcome.model:
        model = UNRESOLVED_MODEL
    elif known_model(outcome.provider, outcome.model):
        model = outcome.model
    else:
        model = OTHER_MODEL
    m.child(m.requests, name, model, provider, outcome.code.name).inc()
    m.child(m.latency, name).observe(elapsed)
    if outcome.error is not None:
        m.child(m.errors, name, outcome.error.reason.value).inc()
    if outcome.attempts and outcome.completed:
        m.child(m.overhead, name).observe(max(elapsed - outcome.upstream_ms / 1000.0, 0.0))
    usage = outcome.usage
    if not outcome.cache_hit:
        if ttft_s is not None:
            m.child(m.ttft, model, provider).observe(ttft_s)
            if outcome.completed and usage is not None and usage.output_tokens >= 2:
                m.child(m.tpot, model, provider).observe(max(elapsed - ttft_s, 0.0) / (usage.output_tokens - 1))
        if usage is not None and (usage.input_tokens or usage.output_tokens):
            m.child(m.tokens, "input", model, provider).inc(usage.input_tokens)
            m.child(m.tokens, "output", model, provider).inc(usage.output_tokens)
        if outcome.cost is not None and outcome.cost.total_usd:
            m.child(m.cost, model, provider).inc(outcome.cost.total_usd)
            m.child(m.key_cost, record.key_id or ANONYMOUS_KEY).inc(outcome.cost.total_usd)
    if len({(a.provider, a.model) for a in outcome.attempts}) > 1 and outcome.completed:
        m.child(m.fallbacks, name).inc()
    retries = _retries(outcome.attempts)
    if retries:
        m.child(m.retries, name).inc(retries)
    for attempt in outcome.attempts:
        if attempt.outcome is AttemptOutcome.ERROR:
            m.child(m.provider_errors, attempt.provider, attempt.error_reason).inc()


def _requested_model(request: object) -> str:
    """The model a request names, clipped to 256 characters ("" for other requests)."""
    if isinstance(request, (pb.ChatRequest, pb.ChatStreamRequest, pb.EmbedRequest, pb.CountTokensRequest)):
        return request.model[:256]
    return ""


def _prompt_text(request: Any) -> str:
    if isinstance(request, pb.EmbedRequest):
        return " | ".join(request.inputs)
    messages = getattr(request, "messages", ())
    return " | ".join("".join(p.text for p in m.content) for m in messages)
