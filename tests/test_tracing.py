"""OpenTelemetry traces through the real server: one SERVER span per RPC with the GenAI
attributes, captured by the SDK's in-memory exporter (the span processor factory is replaced);
then the real OTLP/gRPC exporter against a loopback collector. Off by default."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway_server.config import ConfigError, Settings, TracingSettings
from llm_gateway_server.telemetry import tracing

from .conftest import GatewayFactory, chat, chat_stream, collect
from .emulators.openai_server import OpenAIEmulator

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Spans of gateways built from now on end up here (synchronously, as each span ends)."""
    memory = InMemorySpanExporter()
    monkeypatch.setattr(tracing, "span_processor", lambda settings: SimpleSpanProcessor(memory))
    return memory


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_chat_spans_carry_the_genai_attributes(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, exporter: InMemorySpanExporter
) -> None:
    gateway = await make_gateway(
        {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": openai_upstream.base_url},
        tracing={"enabled": True, "service_name": "gateway-under-test"},
    )
    request = chat("gpt-4o-mini", "Hi", generation=pb.GenerationOptions(temperature=0.2, max_output_tokens=50))
    reply = await gateway.stub.Chat(request, metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),))

    (span,) = _named(exporter, "chat gpt-4o-mini")
    assert span.kind is SpanKind.SERVER
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == attributes["gen_ai.system"] == "openai"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.request.temperature"] == pytest.approx(0.2)
    assert attributes["gen_ai.request.max_tokens"] == 50
    assert attributes["gen_ai.response.model"] == reply.model
    assert attributes["gen_ai.response.id"] == "chatcmpl-emulated"
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["gen_ai.usage.input_tokens"] == reply.usage.input_tokens == 11
    assert attributes["gen_ai.usage.output_tokens"] == reply.usage.output_tokens == 7
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "llm_gateway.v1.LLMGatewayService"
    assert attributes["rpc.method"] == "Chat"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["llm_gateway.request_id"] == reply.id
    assert attributes["llm_gateway.attempts"] == 1
    assert "error.type" not in attributes
    assert span.status.status_code is StatusCode.UNSET
    # The caller's W3C trace context makes the span its child.
    assert span.context is not None and span.parent is not None
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_SPAN_ID
    assert span.resource.attributes["service.name"] == "gateway-under-test"

    events = await collect(gateway.stub.ChatStream(chat_stream("gpt-4o-mini")))
    streamed = [s for s in _named(exporter, "chat gpt-4o-mini") if s is not span]
    assert len(streamed) == 1
    attributes = dict(streamed[0].attributes or {})
    assert attributes["rpc.method"] == "ChatStream"
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["gen_ai.usage.output_tokens"] == events[-1].final.usage.output_tokens
    assert streamed[0].parent is None  # no traceparent: a root span

    await gateway.stub.Embed(pb.EmbedRequest(model="text-embedding-3-small", inputs=["x"]))
    (embed,) = _named(exporter, "embeddings text-embedding-3-small")
    assert dict(embed.attributes or {})["gen_ai.operation.name"] == "embeddings"
    assert dict(embed.attributes or {})["gen_ai.usage.input_tokens"] > 0

    await gateway.stub.ListModels(pb.ListModelsRequest())
    (listing,) = _named(exporter, "llm_gateway.v1.LLMGatewayService/ListModels")
    assert "gen_ai.operation.name" not in dict(listing.attributes or {})


async def test_failed_call_span_has_error_type(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, exporter: InMemorySpanExporter
) -> None:
    gateway = await make_gateway({"OPENAI_BASE_URL": openai_upstream.base_url}, tracing={"enabled": True})
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Chat(chat("status-400"))
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Chat(chat("openai/hang"), timeout=0.3)
    (rejected,) = _named(exporter, "chat status-400")
    attributes = dict(rejected.attributes or {})
    assert attributes["error.type"] == "PROVIDER_REJECTED"
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert attributes["gen_ai.provider.name"] == "openai"
    assert "gen_ai.usage.input_tokens" not in attributes
    assert rejected.status.status_code is StatusCode.ERROR
    for _ in range(100):  # the deadline's span ends as the handler is cut
        if _named(exporter, "chat openai/hang"):
            break
        await asyncio.sleep(0.02)
    (late,) = _named(exporter, "chat openai/hang")
    assert dict(late.attributes or {})["error.type"] in {"DEADLINE_EXCEEDED", "CANCELLED"}


async def test_tracing_is_off_by_default(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, exporter: InMemorySpanExporter
) -> None:
    assert Settings().tracing == TracingSettings(enabled=False, otlp_endpoint=None, service_name="llm-gateway")
    gateway = await make_gateway({"OPENAI_BASE_URL": openai_upstream.base_url})
    await gateway.stub.Chat(chat("gpt-4o-mini"))
    assert exporter.get_finished_spans() == ()


def test_tracing_without_the_sdk_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_HAVE_OTEL", False)
    assert tracing.build_tracing(TracingSettings()) is None  # off: nothing needed
    with pytest.raises(ConfigError, match=r"pip install 'llm-gateway\[otel\]'"):
        tracing.build_tracing(TracingSettings(enabled=True))


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[Any] = []

    def Export(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[_Collector, int]]:
    """A loopback OTLP/gRPC trace collector."""
    servicer = _Collector()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


async def test_otlp_exporter_sends_spans_to_the_collector(
    make_gateway: GatewayFactory,
    openai_upstream: OpenAIEmulator,
    collector: tuple[_Collector, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    servicer, port = collector
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")  # ms between batch exports (default 5 s)
    gateway = await make_gateway(
        {"OPENAI_BASE_URL": openai_upstream.base_url},
        tracing={"enabled": True, "otlp_endpoint": f"http://127.0.0.1:{port}", "service_name": "otlp-test"},
    )
    await gateway.stub.Chat(chat("gpt-4o-mini"))

    def exported() -> list[Any]:
        return [
            (resource_spans, span)
            for request in servicer.requests
            for resource_spans in request.resource_spans
            for scope in resource_spans.scope_spans
            for span in scope.spans
        ]

    for _ in range(250):
        if exported():
            break
        await asyncio.sleep(0.02)
    ((resource_spans, span),) = exported()
    assert span.name == "chat gpt-4o-mini"
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "otlp-test"
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["gen_ai.operation.name"].string_value == "chat"
    assert attributes["gen_ai.usage.output_tokens"].int_value == 7
