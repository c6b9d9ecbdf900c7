"""Ollama 429s carry the upstream's `retry-after-ms` / `retry-after`: as `RetryInfo` on the error,
and as the wait before the gateway's own retry (README "Retries"). Real gateway, real `ollama`
SDK, real HTTP to the loopback emulator (scenarios `ratelimited-*` in tests/emulators/ollama_server.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .conftest import Gateway, GatewayFactory, RichError, chat, chat_stream, collect, expect_error, rich_error
from .emulators.ollama_server import OllamaEmulator

# Retries on, with no backoff of the gateway's own: any wait before the retry is the upstream's.
RETRY_ON_HEADER_ONLY = {"max_attempts": 2, "base_delay_s": 0.0, "max_delay_s": 0.0, "max_retry_after_s": 5.0}
# Many 429s on one deployment must not open its circuit breaker (CIRCUIT_OPEN has its own RetryInfo).
QUIET_BREAKER = {"consecutive_failures": 1000, "min_calls": 1000}


async def ollama_gateway(make_gateway: GatewayFactory, upstream: OllamaEmulator, **overrides: Any) -> Gateway:
    return await make_gateway({"OLLAMA_HOST": upstream.host}, **overrides)


def call(gateway: Gateway, model: str, kind: str) -> Any:
    """The awaitable for one Chat / ChatStream (collected) / Embed call to `ollama/<model>`."""
    name = f"ollama/{model}"
    if kind == "chat":
        return gateway.stub.Chat(chat(name))
    if kind == "stream":
        return collect(gateway.stub.ChatStream(chat_stream(name)))
    return gateway.stub.Embed(pb.EmbedRequest(model=name, inputs=["hello"]))


def retry_delay_s(error: RichError) -> float | None:
    return None if error.retry is None else error.retry.retry_delay.ToNanoseconds() / 1e9


@pytest.mark.parametrize(("model", "delay_s"), [("ratelimited-1500", 1.5), ("ratelimited-s-3", 3.0)])
@pytest.mark.parametrize("kind", ["chat", "stream", "embed"])
async def test_rate_limit_carries_retry_info_from_the_header(
    make_gateway: GatewayFactory, ollama_upstream: OllamaEmulator, model: str, delay_s: float, kind: str
) -> None:
    gateway = await ollama_gateway(make_gateway, ollama_upstream)  # retries off (conftest default)
    error = await expect_error(call(gateway, model, kind))
    assert (error.code, error.info.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED")
    assert error.info.metadata["upstream_status"] == "429"
    assert retry_delay_s(error) == pytest.approx(delay_s)
    assert ollama_upstream.served[model] == 1


async def test_rate_limit_without_header_has_no_retry_info(
    make_gateway: GatewayFactory, ollama_upstream: OllamaEmulator
) -> None:
    gateway = await ollama_gateway(make_gateway, ollama_upstream)
    error = await expect_error(call(gateway, "status-429", "chat"))
    assert (error.code, error.info.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED")
    assert error.retry is None


@pytest.mark.parametrize("kind", ["chat", "stream", "embed"])
async def test_concurrent_calls_keep_their_own_retry_after(
    make_gateway: GatewayFactory, ollama_upstream: OllamaEmulator, kind: str
) -> None:
    """Interleaved calls on one provider (one shared SDK client) never see another call's header."""
    gateway = await ollama_gateway(make_gateway, ollama_upstream, breaker=QUIET_BREAKER)
    expected = {"ratelimited-1100": 1.1, "ratelimited-2300": 2.3, "ratelimited-s-7": 7.0, "status-429": None}
    models = list(expected) * 8
    results = await asyncio.gather(*(call(gateway, m, kind) for m in models), return_exceptions=True)
    for model, result in zip(models, results, strict=True):
        assert isinstance(result, grpc.aio.AioRpcError), (model, result)
        error = rich_error(result)
        assert (error.info.reason, error.info.metadata["model"]) == ("PROVIDER_RATE_LIMITED", model)
        assert retry_delay_s(error) == (None if expected[model] is None else pytest.approx(expected[model])), model


@pytest.mark.parametrize("kind", ["chat", "stream", "embed"])
async def test_retry_waits_for_the_header_then_succeeds(
    make_gateway: GatewayFactory, ollama_upstream: OllamaEmulator, kind: str
) -> None:
    gateway = await ollama_gateway(make_gateway, ollama_upstream, retry=RETRY_ON_HEADER_ONLY)
    model = "ratelimited-once-300"
    result = await call(gateway, model, kind)
    if kind == "chat":
        assert result.message.content[0].text == "echo: Hi"
    elif kind == "stream":
        assert "".join(m.delta.text for m in result[:-1]) == "echo: Hi"
        assert result[-1].WhichOneof("event") == "final"
    else:
        assert len(result.embeddings) == 1
    first, second = ollama_upstream.arrivals[model]
    assert second - first >= 0.3, f"retried after {second - first:.3f}s; retry-after-ms asked for 0.300s"


async def test_retry_after_longer_than_the_limit_is_not_waited_for(
    make_gateway: GatewayFactory, ollama_upstream: OllamaEmulator
) -> None:
    """A header above `max_retry_after_s` means "move on": no retry on the same deployment."""
    retry = {**RETRY_ON_HEADER_ONLY, "max_retry_after_s": 1.0}
    gateway = await ollama_gateway(make_gateway, ollama_upstream, retry=retry)
    error = await expect_error(call(gateway, "ratelimited-1500", "chat"))
    assert (error.code, error.info.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED")
    assert retry_delay_s(error) == pytest.approx(1.5)
    assert ollama_upstream.served["ratelimited-1500"] == 1
