"""Rate limits and the response cache through the real interceptor chain, in memory and on a real
Redis (a throwaway `redis-server` per test), including two gateway processes sharing one Redis and
Redis dying mid-run."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc
from llm_gateway_server.interceptors.auth import hash_key

from .conftest import (
    FAST_RECONNECT,
    GATEWAY_PROCESSES,
    Gateway,
    GatewayFactory,
    RedisServer,
    chat,
    chat_stream,
    collect,
    expect_error,
    free_port,
    rich_error,
)
from .emulators.openai_server import OpenAIEmulator

KEY_A, KEY_B, KEY_A2 = "gw-owner-a-key-0001", "gw-owner-b-key-0002", "gw-owner-a-key-0003"
KEYS = [
    {"id": "a1", "owner": "team-a", "key_sha256": hash_key(KEY_A)},
    {"id": "b1", "owner": "team-b", "key_sha256": hash_key(KEY_B)},
    {"id": "a2", "owner": "team-a", "key_sha256": hash_key(KEY_A2)},
]


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """None for the in-memory backend, else a real Redis URL."""
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


async def _gateway(
    make_gateway: GatewayFactory, upstream: OpenAIEmulator, redis_url: str | None, **settings: Any
) -> Gateway:
    return await make_gateway({"OPENAI_BASE_URL": upstream.base_url}, redis_url=redis_url, **settings)


def _wait_for_fresh_window(margin_s: float = 3.0) -> None:
    """Fixed one-minute windows: keep a burst inside one window."""
    into = time.time() % 60
    if into > 60 - margin_s:
        time.sleep(60 - into + 0.05)


# --- rate limits -----------------------------------------------------------------------------


async def test_requests_per_minute(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, backend: str | None
) -> None:
    _wait_for_fresh_window()
    gateway = await _gateway(make_gateway, openai_upstream, backend, rate_limits={"default_rpm": 3})
    remaining = []
    for _ in range(3):
        call = gateway.stub.Chat(chat("m"))
        await call
        metadata = dict(await call.trailing_metadata())
        remaining.append(metadata["x-ratelimit-remaining-requests"])
        assert metadata["x-ratelimit-limit-requests"] == "3" and metadata["x-ratelimit-reset-requests"].endswith("s")
        assert metadata["x-request-id"], "the servicer's trailer is kept beside the limits"
    assert remaining == ["2", "1", "0"]
    error = await expect_error(gateway.stub.Chat(chat("m")))
    assert (error.code, error.info.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMIT_EXCEEDED")
    assert error.retry is not None and 0 <= error.retry.retry_delay.seconds <= 60
    assert error.info.metadata["limit"] == "requests" and error.info.metadata["scope"] == "peer:127.0.0.1"
    assert len(openai_upstream.requests) == 3


async def test_a_stream_gets_its_limits_before_its_first_message(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator
) -> None:
    _wait_for_fresh_window()
    gateway = await _gateway(make_gateway, openai_upstream, None, rate_limits={"default_rpm": 5})
    call = gateway.stub.ChatStream(chat_stream("stall-stream"))
    metadata = dict(await call.initial_metadata())
    assert metadata["x-ratelimit-limit-requests"] == "5" and metadata["x-ratelimit-remaining-requests"] == "4"
    call.cancel()


async def test_tokens_per_minute_reserve_and_reconcile(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, redis_server: RedisServer
) -> None:
    _wait_for_fresh_window()
    gateway = await _gateway(make_gateway, openai_upstream, redis_server.url, rate_limits={"default_tpm": 200})
    request = chat("m", generation=pb.GenerationOptions(max_output_tokens=150))  # reserves 1 (text) + 4 (framing) + 150
    call = gateway.stub.Chat(request)
    await call
    assert dict(await call.trailing_metadata())["x-ratelimit-remaining-tokens"] == str(200 - 155)  # 1 + 4 + 150
    client = redis.Redis(port=redis_server.port)
    window = int(time.time() // 60)
    counted = client.hget(f"llmgw:{{peer:127.0.0.1}}:peer:127.0.0.1:win:{window}", "t")
    assert int(counted or 0) == 18  # reconciled to the real usage
    await gateway.stub.Chat(request)  # fits again only because the first reservation was reconciled
    error = await expect_error(gateway.stub.Chat(chat("m", generation=pb.GenerationOptions(max_output_tokens=400))))
    assert error.info.reason == "RATE_LIMIT_EXCEEDED" and error.info.metadata["limit"] == "tokens"
    client.close()


async def test_concurrent_streams(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, backend: str | None
) -> None:
    gateway = await _gateway(make_gateway, openai_upstream, backend, rate_limits={"default_max_concurrent_streams": 1})
    first = gateway.stub.ChatStream(chat_stream("stall-stream"))
    await first.read()  # open and held
    error = await expect_error(collect(gateway.stub.ChatStream(chat_stream("m"))))
    assert (error.code, error.info.metadata["limit"]) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "streams")
    first.cancel()
    await asyncio.sleep(0.2)
    events = await collect(gateway.stub.ChatStream(chat_stream("m")))
    assert events[-1].WhichOneof("event") == "final"


async def test_per_key_limits_are_separate(make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator) -> None:
    _wait_for_fresh_window()
    keys = [{**KEYS[0], "rpm": 1}, KEYS[1]]
    gateway = await _gateway(make_gateway, openai_upstream, None, auth={"keys": keys}, rate_limits={"default_rpm": 2})
    await gateway.stub.Chat(chat("m"), metadata=bearer(KEY_A))
    error = await expect_error(gateway.stub.Chat(chat("m"), metadata=bearer(KEY_A)))
    assert error.info.metadata["scope"] == "keys/a1"
    for _ in range(2):
        await gateway.stub.Chat(chat("m"), metadata=bearer(KEY_B))


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_dying_mid_run(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, redis_server: RedisServer, fail_open: bool
) -> None:
    gateway = await _gateway(
        make_gateway,
        openai_upstream,
        redis_server.url,
        metrics_port=free_port(),
        rate_limits={"default_rpm": 100, "fail_open": fail_open},
        cache={"enabled": True},
    )
    await gateway.stub.Chat(chat("m"))
    redis_server.kill()
    started = time.monotonic()
    if fail_open:
        reply = await gateway.stub.Chat(chat("m", "after redis died"))
        assert reply.message.content[0].text == "echo: after redis died"
    else:
        error = await expect_error(gateway.stub.Chat(chat("m", "after redis died")))
        assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, "RATE_LIMITER_UNAVAILABLE")
    assert time.monotonic() - started < 2.0  # bounded by the Redis timeouts, never a hang
    assert gateway.running.metrics is not None
    action = "fail_open" if fail_open else "fail_closed"
    value = gateway.running.metrics.registry.get_sample_value(
        "llm_gateway_state_backend_errors_total", {"component": "rate_limit", "action": action}
    )
    assert value == 1.0


async def test_a_frozen_redis_is_skipped_after_a_few_timeouts(
    make_gateway: GatewayFactory,
    openai_upstream: OpenAIEmulator,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found from outside: with Redis frozen every fail-open call paid ~0.8 s of timeouts. A
    circuit breaker on the state backend now skips Redis after 3 failures in a row (logged,
    counted, health `state/rate_limit` NOT_SERVING) and tries it again after the cooldown."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from llm_gateway_server.config import BreakerSettings
    from llm_gateway_server.state import redis_backend

    monkeypatch.setattr(
        redis_backend, "REDIS_BREAKER", BreakerSettings(consecutive_failures=3, min_calls=10**6, cooldown_s=1.0)
    )
    gateway = await _gateway(
        make_gateway, openai_upstream, redis_server.url, rate_limits={"default_rpm": 1000, "fail_open": True}
    )
    health = health_pb2_grpc.HealthStub(gateway.channel)

    async def state() -> int:
        reply = await health.Check(health_pb2.HealthCheckRequest(service="state/rate_limit"))
        return int(reply.status)

    await gateway.stub.Chat(chat("m"))
    assert await state() == health_pb2.HealthCheckResponse.SERVING
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        slow = []
        for i in range(3):  # each pays the Redis timeouts (0.25 s socket, 0.5 s overall)
            started = time.monotonic()
            await gateway.stub.Chat(chat("m", f"frozen {i}"))
            slow.append(time.monotonic() - started)
        fast = []
        for i in range(5):
            started = time.monotonic()
            reply = await gateway.stub.Chat(chat("m", f"skipped {i}"))
            fast.append(time.monotonic() - started)
            assert reply.message.content[0].text == f"echo: skipped {i}"
        assert min(slow) > 0.2 and max(fast) < 0.15, (slow, fast)
        assert await state() == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    await asyncio.sleep(1.1)  # the cooldown: the next call is the trial, Redis answers
    await gateway.stub.Chat(chat("m", "redis is back"))
    assert await state() == health_pb2.HealthCheckResponse.SERVING


# --- two gateway processes sharing one Redis ---------------------------------------------------


def _start_process(config: Path, port: int, upstream: OpenAIEmulator) -> subprocess.Popen[str]:
    env = {**os.environ, "OPENAI_BASE_URL": upstream.base_url, "LLM_GATEWAY_METRICS_PORT": "0"}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.Popen(
        [sys.executable, "-m", "llm_gateway_server", "serve", "--port", str(port), "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def _ready(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT) as channel:
        await asyncio.wait_for(channel.channel_ready(), 20)


@pytest.fixture
async def two_processes(
    tmp_path: Path, redis_server: RedisServer, openai_upstream: OpenAIEmulator
) -> AsyncIterator[list[str]]:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "redis_url": redis_server.url,
                "rate_limits": {"default_rpm": 10},
                "cache": {"enabled": True, "ttl_s": 60},
            }
        )
    )
    ports = [free_port(), free_port()]
    # Both start at once (the tests time the calls, not the starts): one start's wait, not two.
    processes = [_start_process(config, port, openai_upstream) for port in ports]
    try:
        await asyncio.gather(*(_ready(port) for port in ports))
        yield [f"127.0.0.1:{p}" for p in ports]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=20)


@GATEWAY_PROCESSES
async def test_limit_is_exact_across_two_processes(two_processes: list[str], openai_upstream: OpenAIEmulator) -> None:
    _wait_for_fresh_window(margin_s=10)
    channels = [grpc.aio.insecure_channel(target) for target in two_processes]
    stubs = [pb_grpc.LLMGatewayServiceStub(c) for c in channels]
    # 40 concurrent calls, alternating between the processes, each distinct (no cache hits)
    calls = [stubs[i % 2].Chat(chat("m", f"burst {i}")) for i in range(40)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = [r for r in results if isinstance(r, pb.ChatResponse)]
    refused = [rich_error(r) for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 10, f"{len(ok)} succeeded"
    assert len(refused) == 30 and {e.info.reason for e in refused} == {"RATE_LIMIT_EXCEEDED"}
    assert len(openai_upstream.calls("/chat/completions")) == 10
    for channel in channels:
        await channel.close()


@GATEWAY_PROCESSES
async def test_cache_is_shared_across_two_processes(two_processes: list[str], openai_upstream: OpenAIEmulator) -> None:
    _wait_for_fresh_window()
    async with grpc.aio.insecure_channel(two_processes[0]) as a, grpc.aio.insecure_channel(two_processes[1]) as b:
        first = await pb_grpc.LLMGatewayServiceStub(a).Chat(chat("m", "shared"))
        second = await pb_grpc.LLMGatewayServiceStub(b).Chat(chat("m", "shared"))
    assert not first.cache.hit and second.cache.hit
    assert second.message == first.message and second.id != first.id
    assert len(openai_upstream.calls("/chat/completions")) == 1


# --- cache -----------------------------------------------------------------------------------


@pytest.fixture
async def cached(make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, backend: str | None) -> Gateway:
    return await _gateway(
        make_gateway, openai_upstream, backend, cache={"enabled": True, "ttl_s": 60}, auth={"keys": KEYS}
    )


def _upstream_calls(upstream: OpenAIEmulator) -> int:
    return len(upstream.calls("/chat/completions"))


async def test_cache_hit_and_miss(cached: Gateway, openai_upstream: OpenAIEmulator) -> None:
    first = await cached.stub.Chat(chat("m", "cache me"), metadata=bearer(KEY_A))
    await asyncio.sleep(0.02)
    second = await cached.stub.Chat(chat("m", "cache me", metadata={"label": "x"}), metadata=bearer(KEY_A))
    assert (first.cache.hit, second.cache.hit) == (False, True)
    assert second.cache.age_ms >= 10 and second.message == first.message and second.usage == first.usage
    assert _upstream_calls(openai_upstream) == 1
    different = await cached.stub.Chat(
        chat("m", "cache me", generation=pb.GenerationOptions(seed=1)), metadata=bearer(KEY_A)
    )
    assert not different.cache.hit and _upstream_calls(openai_upstream) == 2


async def test_cache_modes(cached: Gateway, openai_upstream: OpenAIEmulator) -> None:
    def mode(value: int) -> pb.CacheOptions:
        return pb.CacheOptions(mode=value)  # type: ignore[arg-type]

    auth = bearer(KEY_A)
    assert not (await cached.stub.Chat(chat("m", "q", cache=mode(pb.CACHE_MODE_READ_ONLY)), metadata=auth)).cache.hit
    assert not (await cached.stub.Chat(chat("m", "q", cache=mode(pb.CACHE_MODE_READ_ONLY)), metadata=auth)).cache.hit
    assert not (await cached.stub.Chat(chat("m", "q", cache=mode(pb.CACHE_MODE_BYPASS)), metadata=auth)).cache.hit
    assert _upstream_calls(openai_upstream) == 3  # read-only and bypass never stored
    assert not (await cached.stub.Chat(chat("m", "q", cache=mode(pb.CACHE_MODE_REFRESH)), metadata=auth)).cache.hit
    assert (await cached.stub.Chat(chat("m", "q"), metadata=auth)).cache.hit  # refresh stored it
    assert not (await cached.stub.Chat(chat("m", "q", cache=mode(pb.CACHE_MODE_REFRESH)), metadata=auth)).cache.hit
    assert (await cached.stub.Chat(chat("m", "q", cache=mode(pb.CACHE_MODE_BYPASS)), metadata=auth)).cache.hit is False
    assert _upstream_calls(openai_upstream) == 6


async def test_stream_replay_and_incomplete_streams_never_fill(
    cached: Gateway, openai_upstream: OpenAIEmulator
) -> None:
    auth = bearer(KEY_A)
    first = await collect(cached.stub.ChatStream(chat_stream("m", "stream me"), metadata=auth))
    second = await collect(cached.stub.ChatStream(chat_stream("m", "stream me"), metadata=auth))
    assert [e.delta.text for e in second[:-1]] == [e.delta.text for e in first[:-1]]
    assert second[-1].final.cache.hit and not first[-1].final.cache.hit
    assert len({e.id for e in second}) == 1 and second[0].id != first[0].id
    assert _upstream_calls(openai_upstream) == 1
    # a unary Chat with the same fields is a different entry (different method)
    assert not (await cached.stub.Chat(chat("m", "stream me"), metadata=auth)).cache.hit
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError):
            await collect(cached.stub.ChatStream(chat_stream("stream-error", "broken"), metadata=auth))
    assert openai_upstream.served["stream-error"] == 2


async def test_no_cross_owner_hits(cached: Gateway, openai_upstream: OpenAIEmulator) -> None:
    await cached.stub.Chat(chat("m", "tenant data"), metadata=bearer(KEY_A))
    other_owner = await cached.stub.Chat(chat("m", "tenant data"), metadata=bearer(KEY_B))
    same_owner_other_key = await cached.stub.Chat(chat("m", "tenant data"), metadata=bearer(KEY_A2))
    assert not other_owner.cache.hit and same_owner_other_key.cache.hit
    assert _upstream_calls(openai_upstream) == 2


async def test_ttl_expiry(cached: Gateway, openai_upstream: OpenAIEmulator) -> None:
    request = chat("m", "short lived", cache=pb.CacheOptions(ttl_seconds=1))
    await cached.stub.Chat(request, metadata=bearer(KEY_A))
    assert (await cached.stub.Chat(request, metadata=bearer(KEY_A))).cache.hit
    await asyncio.sleep(1.1)
    assert not (await cached.stub.Chat(request, metadata=bearer(KEY_A))).cache.hit
    assert _upstream_calls(openai_upstream) == 2


async def test_embed_is_cached(cached: Gateway, openai_upstream: OpenAIEmulator) -> None:
    request = pb.EmbedRequest(model="text-embedding-3-small", inputs=["a", "b"])
    first = await cached.stub.Embed(request, metadata=bearer(KEY_A))
    second = await cached.stub.Embed(request, metadata=bearer(KEY_A))
    assert not first.cache.hit and second.cache.hit and second.embeddings == first.embeddings
    assert len(openai_upstream.calls("/embeddings")) == 1


async def test_a_negative_max_output_tokens_cannot_poison_the_tokens_window(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, backend: str | None
) -> None:
    """Found from outside: the limiter reserved the token estimate before the request was
    validated, so `max_output_tokens: -2147483648` reserved a negative amount; with two such calls
    in flight a reconcile clamped the counter at 0 and the other refund left ~2^31 tokens "used",
    refusing every call of the scope for the rest of the minute (in memory and on Redis)."""
    _wait_for_fresh_window()
    gateway = await _gateway(make_gateway, openai_upstream, backend, rate_limits={"default_tpm": 100_000})
    hostile = chat("m", "x", generation=pb.GenerationOptions(max_output_tokens=-(2**31)))
    results = await asyncio.gather(*(gateway.stub.Chat(hostile) for _ in range(20)), return_exceptions=True)
    for result in results:
        assert isinstance(result, grpc.aio.AioRpcError)
        error = rich_error(result)
        assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
        assert error.bad_request is not None
        assert error.bad_request.field_violations[0].field == "generation.max_output_tokens"
    reply = await gateway.stub.Chat(chat("m", "still allowed"))
    assert reply.message.content[0].text == "echo: still allowed"
