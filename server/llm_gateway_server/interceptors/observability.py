"""The outermost interceptor: assigns the request id and the call record, then writes one
structured log line and the metrics of every RPC (method, peer, key id, model, provider, status,
latency, time to first token, tokens, cost, cache, attempts, gateway overhead).

Everything it reports comes from the call's typed `CallOutcome` (filled by the router, the
executor, the cache and `transport.status.abort`), not from the protobuf messages; only prompt
and answer text (with `log_content`) are read from the messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from llm_gateway.v1 import llm_gateway_pb2 as pb

from ..domain import AttemptOutcome
from ..outcome import CallOutcome
from ..telemetry.metrics import Metrics
from ..transport.call_record import CallRecord, current_call, request_id_from
from .base import GatewayInterceptor, StreamBehavior, UnaryBehavior, method_name

log = structlog.get_logger("llm_gateway.rpc")


def _cancelled(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """CANCELLED, or DEADLINE_EXCEEDED when the client's deadline is what ended the call."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


class ObservabilityInterceptor(GatewayInterceptor):
    """Logs and measures every RPC; `log_content` adds prompt and answer text to the log line."""

    def __init__(self, metrics: Metrics | None, log_content: bool = False) -> None:
        super().__init__()
        self._metrics = metrics
        self._log_content = log_content

    @staticmethod
    def _begin(context: grpc.aio.ServicerContext[Any, Any], method: str) -> CallRecord:
        metadata = context.invocation_metadata()
        record = CallRecord(request_id=request_id_from(metadata), method=method, peer=context.peer() or "")
        current_call.set(record)
        return record

    async def unary(
        self, inner: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        record = self._begin(context, method)
        started = time.perf_counter()
        answer = ""
        try:
            response = await inner(request, context)
            if self._log_content and isinstance(response, pb.ChatResponse):
                answer = "".join(p.text for p in response.message.content)
            return response
        except asyncio.CancelledError:
            record.outcome.code = _cancelled(context)
            raise
        finally:
            self._finish(record, request, started, None, answer)

    async def stream(
        self, inner: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        record = self._begin(context, method)
        started = time.perf_counter()
        first_s: float | None = None
        pieces: list[str] = []
        try:
            async for message in inner(request, context):
                if first_s is None:
                    first_s = time.perf_counter() - started
                if self._log_content and message.WhichOneof("event") == "delta":
                    pieces.append(message.delta.text)
                yield message
        except (asyncio.CancelledError, GeneratorExit):
            record.outcome.code = _cancelled(context)
            raise
        finally:
            self._finish(record, request, started, first_s, "".join(pieces))

    def _finish(self, record: CallRecord, request: Any, started: float, ttft_s: float | None, answer: str) -> None:
        elapsed = time.perf_counter() - started
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
        if ttft_s is not None:
            fields["ttft_ms"] = round(ttft_s * 1000.0, 3)
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
            fields["answer"] = answer
        log.info("rpc", **fields)
        if self._metrics is not None:
            _record_metrics(self._metrics, name, outcome, elapsed, ttft_s)


def _record_metrics(m: Metrics, name: str, outcome: CallOutcome, elapsed: float, ttft_s: float | None) -> None:
    model = outcome.model or "unresolved"
    provider = outcome.provider or "none"
    m.requests.labels(name, model, provider, outcome.code.name).inc()
    m.latency.labels(name).observe(elapsed)
    if outcome.attempts and outcome.completed:
        m.overhead.labels(name).observe(max(elapsed - outcome.upstream_ms / 1000.0, 0.0))
    if ttft_s is not None and not outcome.cache_hit:
        m.ttft.labels(model, provider).observe(ttft_s)
    usage = outcome.usage
    if usage is not None and not outcome.cache_hit and (usage.input_tokens or usage.output_tokens):
        m.tokens.labels("input", model, provider).inc(usage.input_tokens)
        m.tokens.labels("output", model, provider).inc(usage.output_tokens)
    if outcome.cost is not None and outcome.cost.total_usd and not outcome.cache_hit:
        m.cost.labels(model, provider).inc(outcome.cost.total_usd)
    if len({(a.provider, a.model) for a in outcome.attempts}) > 1 and outcome.completed:
        m.fallbacks.labels(name).inc()
    for attempt in outcome.attempts:
        if attempt.outcome is AttemptOutcome.ERROR:
            m.provider_errors.labels(attempt.provider, attempt.error_reason).inc()


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
