"""Optional OpenTelemetry traces (`tracing.enabled`, off by default; the `otel` extra installs
the packages): one SERVER span per RPC, exported over OTLP/gRPC with a batch processor.

Spans follow the OpenTelemetry GenAI semantic conventions: Chat and ChatStream are operation
`chat`, Embed is `embeddings`, named `{gen_ai.operation.name} {gen_ai.request.model}` (other
methods: `{rpc.service}/{rpc.method}`), with `gen_ai.operation.name`, `gen_ai.provider.name` (and
the older `gen_ai.system`, same value: the configured provider name), `gen_ai.request.model`,
`gen_ai.request.temperature` / `top_p` / `max_tokens` when set, `gen_ai.response.model`,
`gen_ai.response.id`, `gen_ai.response.finish_reasons`, `gen_ai.usage.input_tokens` /
`output_tokens` (not for cache hits: they spent none) and, on failure, `error.type` (the
`ErrorInfo.reason`, or the status code of a call that ended without one) with an ERROR status.
The RPC attributes (`rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`) and the
gateway's own (`llm_gateway.request_id`, `.key_id`, `.cache_hit`, `.attempts`) are set too. A
W3C `traceparent` in the request metadata makes the span its child. Sampling follows the SDK's
standard variables (`OTEL_TRACES_SAMPLER`, ...).

Each server has its own `TracerProvider` (none is installed globally: several servers in one
process, as in tests, stay apart); it flushes its spans at process exit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .. import __version__
from ..config import ConfigError, TracingSettings
from ..transport.call_record import CallRecord

try:
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the `otel` extra is not installed: `build_tracing` says so when tracing is on
    _HAVE_OTEL = False
else:
    _HAVE_OTEL = True

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor

_MISSING = "tracing.enabled needs OpenTelemetry: pip install 'llm-gateway[otel]'"
# gRPC method → gen_ai.operation.name
_OPERATIONS = {"Chat": "chat", "ChatStream": "chat", "Embed": "embeddings"}
_MODEL_REQUESTS = (pb.ChatRequest, pb.ChatStreamRequest, pb.EmbedRequest, pb.CountTokensRequest)


def finish_reason_name(value: int) -> str:
    """`FINISH_REASON_TOOL_CALLS` (a `pb.FinishReason`) → "tool_calls" ("" when unspecified)."""
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return ""
    return str(pb.FinishReason.Name(value)).removeprefix("FINISH_REASON_").lower()


class RpcTracing:
    """Starts and ends the span of each RPC (`ObservabilityInterceptor` calls it)."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self._propagator = TraceContextTextMapPropagator()

    def start(self, method: str, request: Any, metadata: Sequence[tuple[str, Any]] | None) -> Span:
        """The span of an RPC that starts now (`method`: the full gRPC method name)."""
        service, _, name = method.lstrip("/").rpartition("/")
        operation = _OPERATIONS.get(name)
        model = request.model[:256] if isinstance(request, _MODEL_REQUESTS) else ""
        attributes: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
        if model:
            attributes["gen_ai.request.model"] = model
        if isinstance(request, (pb.ChatRequest, pb.ChatStreamRequest)) and request.HasField("generation"):
            options = request.generation
            if options.HasField("temperature"):
                attributes["gen_ai.request.temperature"] = options.temperature
            if options.HasField("top_p"):
                attributes["gen_ai.request.top_p"] = options.top_p
            if options.HasField("max_output_tokens"):
                attributes["gen_ai.request.max_tokens"] = options.max_output_tokens
        span_name = f"{service}/{name}" if operation is None else f"{operation} {model}".rstrip()
        carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
        parent = self._propagator.extract(carrier) if carrier else None
        return self._tracer.start_span(span_name, context=parent, kind=SpanKind.SERVER, attributes=attributes)

    @staticmethod
    def end(span: Span, record: CallRecord, finish_reason: str = "", response_id: str = "") -> None:
        """Notes what the call came to (its `CallOutcome`) on `span` and ends it."""
        outcome = record.outcome
        attributes: dict[str, Any] = {
            "llm_gateway.request_id": record.request_id,
            "llm_gateway.cache_hit": outcome.cache_hit,
            "llm_gateway.attempts": len(outcome.attempts),
            "rpc.grpc.status_code": outcome.code.value[0],
        }
        if record.key_id:
            attributes["llm_gateway.key_id"] = record.key_id
        if outcome.provider:
            attributes["gen_ai.provider.name"] = attributes["gen_ai.system"] = outcome.provider
        if outcome.answered_model:
            attributes["gen_ai.response.model"] = outcome.answered_model
        if response_id:
            attributes["gen_ai.response.id"] = response_id
        if finish_reason:
            attributes["gen_ai.response.finish_reasons"] = (finish_reason,)
        if outcome.usage is not None and not outcome.cache_hit:
            attributes["gen_ai.usage.input_tokens"] = outcome.usage.input_tokens
            attributes["gen_ai.usage.output_tokens"] = outcome.usage.output_tokens
        span.set_attributes(attributes)
        if outcome.code is not grpc.StatusCode.OK:
            error_type = outcome.error.reason.value if outcome.error is not None else outcome.code.name
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR, error_type))
        span.end()


def span_processor(settings: TracingSettings) -> SpanProcessor:
    """A batch processor over the OTLP/gRPC exporter to `settings.otlp_endpoint` (None: the
    exporter's default, or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`).
    `http://` endpoints are plaintext, `https://` ones TLS.

    Raises:
        ConfigError: the OTLP exporter is not installed.
    """
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415 - optional, loaded when on
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(_MISSING) from exc
    return BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint))


def build_tracing(settings: TracingSettings) -> RpcTracing | None:
    """The RPC tracing of `settings` (None when off).

    Raises:
        ConfigError: tracing is on and the OpenTelemetry SDK or exporter is not installed.
    """
    if not settings.enabled:
        return None
    if not _HAVE_OTEL:
        raise ConfigError(_MISSING)
    try:
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 - optional, loaded when on
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(_MISSING) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    provider.add_span_processor(span_processor(settings))
    return RpcTracing(provider.get_tracer("llm_gateway_server", __version__))
