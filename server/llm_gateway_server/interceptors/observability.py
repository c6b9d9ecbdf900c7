"""The outermost interceptor: assigns the request id, then writes one structured log line and the
metrics of every RPC (method, peer, key id, model, provider, status, latency, time to first token,
tokens, cost, cache, attempts, gateway overhead)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from ..telemetry.metrics import Metrics
from ..transport.call import CallRecord, current_call
from .base import GatewayInterceptor, StreamBehavior, UnaryBehavior, method_name

log = structlog.get_logger("llm_gateway.rpc")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


class _Outcome:
    """What the responses of one call said (filled while they pass)."""

    __slots__ = (
        "attempts",
        "cache_hit",
        "cost",
        "failed",
        "fallback",
        "input_tokens",
        "model",
        "output_tokens",
        "provider",
        "text",
        "ttft_s",
        "upstream_s",
    )

    def __init__(self) -> None:
        self.model = self.provider = self.text = ""
        self.input_tokens = self.output_tokens = self.attempts = 0
        self.cost = self.upstream_s = 0.0
        self.ttft_s: float | None = None
        self.cache_hit = self.fallback = False
        self.failed: list[tuple[str, str]] = []  # (provider, reason) of failed attempts before the answer

    def observe(self, message: Any) -> None:
        """Reads a ChatResponse, EmbedResponse or the final ChatStreamResponse."""
        body = message.final if hasattr(message, "final") and message.WhichOneof("event") == "final" else message
        if not hasattr(body, "usage"):
            return
        self.model = getattr(message, "model", "") or self.model
        self.provider = getattr(message, "provider", "") or self.provider
        self.input_tokens, self.output_tokens = body.usage.input_tokens, body.usage.output_tokens
        self.cost = body.cost.total_usd
        self.cache_hit = body.cache.hit
        self.attempts = len(body.attempts)
        self.upstream_s = sum(a.latency_ms for a in body.attempts) / 1000.0
        self.fallback = len({(a.provider, a.model) for a in body.attempts}) > 1
        self.failed = [(a.provider, a.error_reason) for a in body.attempts if a.error_reason and a.latency_ms > 0]


class ObservabilityInterceptor(GatewayInterceptor):
    """Logs and measures every RPC; `log_content` adds prompt and answer text to the log line."""

    def __init__(self, metrics: Metrics | None, log_content: bool = False) -> None:
        super().__init__()
        self._metrics = metrics
        self._log_content = log_content

    def _begin(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> CallRecord:
        record = CallRecord(request_id=_request_id(context), method=method, peer=context.peer() or "")
        current_call.set(record)
        return record

    async def unary(
        self, inner: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        record = self._begin(context, method)
        outcome = _Outcome()
        started = time.perf_counter()
        try:
            response = await inner(request, context)
            outcome.observe(response)
            if self._log_content:
                outcome.text = "".join(p.text for p in getattr(getattr(response, "message", None), "content", ()))
            return response
        except asyncio.CancelledError:
            record.code = "CANCELLED"
            raise
        finally:
            self._finish(record, outcome, request, started)

    async def stream(
        self, inner: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        record = self._begin(context, method)
        outcome = _Outcome()
        started = time.perf_counter()
        pieces: list[str] = []
        try:
            async for message in inner(request, context):
                if outcome.ttft_s is None and message.WhichOneof("event") == "delta":
                    outcome.ttft_s = time.perf_counter() - started
                if self._log_content and message.WhichOneof("event") == "delta":
                    pieces.append(message.delta.text)
                outcome.observe(message)
                yield message
        except (asyncio.CancelledError, GeneratorExit):
            record.code = "CANCELLED"
            raise
        finally:
            outcome.text = "".join(pieces)
            self._finish(record, outcome, request, started)

    def _finish(self, record: CallRecord, outcome: _Outcome, request: Any, started: float) -> None:
        elapsed = time.perf_counter() - started
        name = method_name(record.method)
        fields: dict[str, Any] = {
            "request_id": record.request_id,
            "method": name,
            "peer": record.peer,
            "key_id": record.key_id,
            "model": outcome.model or getattr(request, "model", ""),
            "provider": outcome.provider,
            "code": record.code,
            "latency_ms": round(elapsed * 1000.0, 3),
        }
        if record.reason:
            fields["reason"] = record.reason
        if outcome.ttft_s is not None:
            fields["ttft_ms"] = round(outcome.ttft_s * 1000.0, 3)
        if outcome.attempts:
            fields.update(
                input_tokens=outcome.input_tokens,
                output_tokens=outcome.output_tokens,
                cost_usd=outcome.cost,
                cache_hit=outcome.cache_hit,
                attempts=outcome.attempts,
            )
        if record.error is not None and record.error.metadata:
            fields["error"] = {k: v for k, v in record.error.metadata.items() if k != "request_id"}
        if self._log_content:
            fields["prompt"] = _prompt_text(request)
            fields["answer"] = outcome.text
        log.info("rpc", **fields)
        if self._metrics is not None:
            self._record_metrics(name, record, outcome, elapsed)

    def _record_metrics(self, name: str, record: CallRecord, outcome: _Outcome, elapsed: float) -> None:
        m = self._metrics
        assert m is not None
        model = outcome.model or "unresolved"
        provider = outcome.provider or "none"
        m.requests.labels(name, model, provider, record.code).inc()
        m.latency.labels(name).observe(elapsed)
        if outcome.attempts and not outcome.cache_hit:
            m.overhead.labels(name).observe(max(elapsed - outcome.upstream_s, 0.0))
        if outcome.ttft_s is not None:
            m.ttft.labels(model, provider).observe(outcome.ttft_s)
        if outcome.input_tokens or outcome.output_tokens:
            m.tokens.labels("input", model, provider).inc(outcome.input_tokens)
            m.tokens.labels("output", model, provider).inc(outcome.output_tokens)
        if outcome.cost:
            m.cost.labels(model, provider).inc(outcome.cost)
        if outcome.fallback:
            m.fallbacks.labels(name).inc()
        if not outcome.cache_hit:
            for provider_name, reason in outcome.failed:
                m.provider_errors.labels(provider_name, reason).inc()
        error = record.error
        if error is not None and error.metadata.get("provider"):
            m.provider_errors.labels(error.metadata["provider"], error.reason).inc()


def _prompt_text(request: Any) -> str:
    messages = getattr(request, "messages", None)
    if messages is None:
        return " | ".join(getattr(request, "inputs", ()))
    return " | ".join("".join(p.text for p in m.content) for m in messages)
