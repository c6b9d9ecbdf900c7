"""The Prometheus endpoint after a few calls: every series the gateway promises, with sensible values."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .conftest import GatewayFactory, chat, chat_stream, collect, free_port
from .emulators.openai_server import OpenAIEmulator


async def test_metrics_endpoint_shows_the_series(make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator) -> None:
    port = free_port()
    gateway = await make_gateway(
        {"OPENAI_BASE_URL": openai_upstream.base_url},
        metrics_port=port,
        cache={"enabled": True},
        rate_limits={"default_rpm": 6},
        breaker={"consecutive_failures": 1},
        aliases=[
            {
                "name": "fb",
                "deployments": [
                    {"provider": "openai", "model": "status-503"},
                    {"provider": "openai", "model": "gpt-4o-mini", "priority": 1},
                ],
            }
        ],
    )
    await gateway.stub.Chat(chat("gpt-4o-mini", "one"))
    await gateway.stub.Chat(chat("gpt-4o-mini", "one"))  # cache hit
    await collect(gateway.stub.ChatStream(chat_stream("gpt-4o-mini", "two")))
    await gateway.stub.Chat(chat("fb", "three"))  # 503, then the fallback answers; breaker opens
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Chat(chat("status-400"))
    await gateway.stub.Embed(pb.EmbedRequest(model="text-embedding-3-small", inputs=["x"]))
    with pytest.raises(grpc.aio.AioRpcError):
        await gateway.stub.Chat(chat("gpt-4o-mini", "over the limit"))  # the 7th call this minute

    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("llm_gateway_requests_total", method="Chat", model="gpt-4o-mini", provider="openai", code="OK") == 3
    assert (
        value("llm_gateway_requests_total", method="ChatStream", model="gpt-4o-mini", provider="openai", code="OK") == 1
    )
    # A failed call keeps the deployment it was routed to; one refused before routing has none.
    assert (
        value(
            "llm_gateway_requests_total", method="Chat", model="status-400", provider="openai", code="INVALID_ARGUMENT"
        )
        == 1
    )
    assert (
        value(
            "llm_gateway_requests_total", method="Chat", model="unresolved", provider="none", code="RESOURCE_EXHAUSTED"
        )
        == 1
    )
    assert value("llm_gateway_request_duration_seconds_count", method="Chat") == 5
    assert value("llm_gateway_time_to_first_token_seconds_count", model="gpt-4o-mini", provider="openai") == 1
    assert value("llm_gateway_overhead_seconds_count", method="Chat") == 2  # upstream-served calls only
    assert 0 < value("llm_gateway_overhead_seconds_sum", method="Chat") < 1
    # Three upstream-served calls of 11 input tokens; the cache hit spent none.
    assert value("llm_gateway_tokens_total", direction="input", model="gpt-4o-mini", provider="openai") == 33
    assert value("llm_gateway_cost_usd_total", model="gpt-4o-mini", provider="openai") > 0
    assert value("llm_gateway_cache_requests_total", method="Chat", result="hit") == 1
    assert value("llm_gateway_cache_requests_total", method="Chat", result="miss") >= 2
    assert value("llm_gateway_rate_limit_rejections_total", limit="requests") == 1
    assert value("llm_gateway_fallbacks_total", method="Chat") == 1
    assert value("llm_gateway_provider_errors_total", provider="openai", reason="PROVIDER_REJECTED") == 1
    assert value("llm_gateway_provider_errors_total", provider="openai", reason="PROVIDER_UNAVAILABLE") == 1
    assert value("llm_gateway_circuit_breaker_state", deployment="openai/status-503") == 2
    print("\n".join(line for line in text.splitlines() if line.startswith("llm_gateway_") and "_bucket" not in line))
