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
    # A failed call keeps the deployment it was routed to (a passthrough model the configuration does
    # not name is "other"); one refused before routing has none.
    assert (
        value("llm_gateway_requests_total", method="Chat", model="other", provider="openai", code="INVALID_ARGUMENT")
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
    assert value("llm_gateway_errors_total", method="Chat", reason="PROVIDER_REJECTED") == 1
    assert value("llm_gateway_errors_total", method="Chat", reason="RATE_LIMIT_EXCEEDED") == 1
    assert value("llm_gateway_in_flight_calls", method="Chat") == 0  # every call has ended
    assert value("llm_gateway_key_cost_usd_total", key="anonymous") == pytest.approx(
        value("llm_gateway_cost_usd_total", model="gpt-4o-mini", provider="openai")
        + value("llm_gateway_cost_usd_total", model="text-embedding-3-small", provider="openai")
    )
    assert value("llm_gateway_retries_total", method="Chat") == 0  # one attempt per deployment here
    print("\n".join(line for line in text.splitlines() if line.startswith("llm_gateway_") and "_bucket" not in line))


async def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    )
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of the `name` samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


async def test_provider_errors_and_retries_count_attempts(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator
) -> None:
    """Three attempts per deployment: `flaky-503-2` fails twice, then answers (2 retries); `fb`'s
    first deployment fails three times (2 retries), then its fallback answers."""
    port = free_port()
    gateway = await make_gateway(
        {"OPENAI_BASE_URL": openai_upstream.base_url},
        metrics_port=port,
        retry={"max_attempts": 3, "base_delay_s": 0.001, "max_delay_s": 0.005},
        aliases=[
            {"name": "flaky", "deployments": [{"provider": "openai", "model": "flaky-503-2"}]},
            {
                "name": "fb",
                "deployments": [
                    {"provider": "openai", "model": "status-503"},
                    {"provider": "openai", "model": "gpt-4o-mini", "priority": 1},
                ],
            },
        ],
    )
    await gateway.stub.Chat(chat("flaky"))
    await gateway.stub.Chat(chat("fb"))
    samples = await _scrape(port)
    assert _total(samples, "llm_gateway_requests_total", method="Chat", code="OK") == 2
    assert _total(samples, "llm_gateway_requests_total", model="flaky-503-2", provider="openai") == 1
    # Every failed attempt counts (2 + 3), not every failed call (there is none).
    assert _total(samples, "llm_gateway_provider_errors_total", provider="openai", reason="PROVIDER_UNAVAILABLE") == 5
    assert _total(samples, "llm_gateway_retries_total", method="Chat") == 4
    assert _total(samples, "llm_gateway_fallbacks_total", method="Chat") == 1
    assert _total(samples, "llm_gateway_errors_total") == 0


async def test_model_label_is_bounded_to_configured_models(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator
) -> None:
    """Model names a client chooses on a passthrough provider create no series: they count as
    "other"; catalog models and the models the aliases name keep their names."""
    port = free_port()
    gateway = await make_gateway(
        {"OPENAI_BASE_URL": openai_upstream.base_url},
        metrics_port=port,
        aliases=[{"name": "mine", "deployments": [{"provider": "openai", "model": "emulated-model"}]}],
    )
    chosen = [f"client-chose-{i}" for i in range(5)]
    for model in chosen:
        await gateway.stub.Chat(chat(model))
    await collect(gateway.stub.ChatStream(chat_stream("openai/client-chose-stream")))
    await gateway.stub.Chat(chat("mine"))
    await gateway.stub.Chat(chat("gpt-4o-mini"))
    samples = await _scrape(port)
    labels = {dict(ls).get("model") for (_, ls) in samples}
    assert not {m for m in labels if m and m.startswith("client-chose")}, labels
    assert _total(samples, "llm_gateway_requests_total", method="Chat", model="other", code="OK") == 5
    assert _total(samples, "llm_gateway_requests_total", method="ChatStream", model="other", code="OK") == 1
    assert _total(samples, "llm_gateway_requests_total", model="emulated-model") == 1  # named by the alias
    assert _total(samples, "llm_gateway_requests_total", model="gpt-4o-mini") == 1  # a catalog model
    assert _total(samples, "llm_gateway_tokens_total", direction="input", model="other") == 6 * 11
    assert _total(samples, "llm_gateway_time_to_first_token_seconds_count", model="other") == 1
    assert _total(samples, "llm_gateway_time_per_output_token_seconds_count", model="other") == 1


async def test_time_per_output_token_of_a_paced_stream(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator
) -> None:
    """`paced-20` waits 20 ms after every upstream chunk: (duration - TTFT) / (7 output tokens - 1)
    lands near 20 ms. Unary calls record none."""
    port = free_port()
    gateway = await make_gateway(
        {"OPENAI_BASE_URL": openai_upstream.base_url},
        metrics_port=port,
        aliases=[{"name": "paced", "deployments": [{"provider": "openai", "model": "paced-20"}]}],
    )
    events = await collect(gateway.stub.ChatStream(chat_stream("paced")))
    assert events[-1].final.usage.output_tokens == 7
    await gateway.stub.Chat(chat("paced"))
    samples = await _scrape(port)
    labels = {"model": "paced-20", "provider": "openai"}
    assert _total(samples, "llm_gateway_time_per_output_token_seconds_count", **labels) == 1
    per_token = _total(samples, "llm_gateway_time_per_output_token_seconds_sum", **labels)
    assert 0.005 < per_token < 0.5, per_token
    assert _total(samples, "llm_gateway_time_to_first_token_seconds_count", **labels) == 1


async def test_in_flight_calls_while_a_call_runs(make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator) -> None:
    port = free_port()
    gateway = await make_gateway({"OPENAI_BASE_URL": openai_upstream.base_url}, metrics_port=port)
    call = gateway.stub.Chat(chat("hang"))
    await asyncio.wait_for(openai_upstream.hang_started.wait(), 5)
    assert _total(await _scrape(port), "llm_gateway_in_flight_calls", method="Chat") == 1
    call.cancel()
    for _ in range(200):
        if _total(await _scrape(port), "llm_gateway_in_flight_calls", method="Chat") == 0:
            break
        await asyncio.sleep(0.01)
    samples = await _scrape(port)
    assert _total(samples, "llm_gateway_in_flight_calls", method="Chat") == 0
    assert _total(samples, "llm_gateway_requests_total", method="Chat", code="CANCELLED") == 1


async def test_cost_by_api_key_id(make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator) -> None:
    from llm_gateway_server.interceptors.auth import hash_key

    port = free_port()
    gateway = await make_gateway(
        {"OPENAI_BASE_URL": openai_upstream.base_url},
        metrics_port=port,
        auth={"keys": [{"id": "team-a-prod", "key_sha256": hash_key("sk-gw-team-a")}]},
    )
    await gateway.stub.Chat(chat("gpt-4o-mini"), metadata=(("authorization", "Bearer sk-gw-team-a"),))
    samples = await _scrape(port)
    assert _total(samples, "llm_gateway_key_cost_usd_total", key="team-a-prod") == pytest.approx(
        _total(samples, "llm_gateway_cost_usd_total", model="gpt-4o-mini")
    )
    assert _total(samples, "llm_gateway_key_cost_usd_total", key="team-a-prod") > 0
    assert _total(samples, "llm_gateway_key_cost_usd_total", key="anonymous") == 0
