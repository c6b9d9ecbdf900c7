"""Authentication through the real interceptor chain, and secrets never reaching the logs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc
from llm_gateway_server.config import ConfigError
from llm_gateway_server.interceptors.auth import hash_key

from .conftest import OPENAI_TEST_KEY, Gateway, GatewayFactory, chat, chat_stream, collect, expect_error, free_port
from .emulators.openai_server import OpenAIEmulator

GOOD = "gw-test-key-alpha-0123456789"
OTHER = "gw-test-key-beta-9876543210"
DISABLED = "gw-test-key-disabled-000000"
EXPIRED = "gw-test-key-expired-1111111"
KEYS = [
    {"id": "alpha", "owner": "team-a", "key_sha256": hash_key(GOOD), "allowed_models": ["m", "gpt-*", "status-*"]},
    {"id": "beta", "owner": "team-b", "key_sha256": hash_key(OTHER), "allowed_models": ["gpt-4o-mini"]},
    {"id": "off", "key_sha256": hash_key(DISABLED), "disabled": True},
    {"id": "old", "key_sha256": hash_key(EXPIRED), "expires_at": "2020-01-01T00:00:00Z"},
]


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def secured(make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator) -> Gateway:
    return await make_gateway(
        {"OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": openai_upstream.base_url}, auth={"keys": KEYS}
    )


async def test_valid_key_bearer_and_x_api_key(secured: Gateway) -> None:
    reply = await secured.stub.Chat(chat("m"), metadata=bearer(GOOD))
    assert reply.message.content[0].text == "echo: Hi"
    events = await collect(secured.stub.ChatStream(chat_stream("m"), metadata=(("x-api-key", GOOD),)))
    assert events[-1].WhichOneof("event") == "final"


@pytest.mark.parametrize(
    ("metadata", "code", "reason"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID"),
        (bearer("wrong-key"), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID"),
        ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID"),
        (bearer(DISABLED), grpc.StatusCode.PERMISSION_DENIED, "API_KEY_DISABLED"),
        (bearer(EXPIRED), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_EXPIRED"),
    ],
)
@pytest.mark.parametrize("rpc", ["Chat", "ChatStream", "Embed", "ListModels"])
async def test_rejected_keys(
    secured: Gateway, openai_upstream: OpenAIEmulator, metadata: Any, code: grpc.StatusCode, reason: str, rpc: str
) -> None:
    calls = {
        "Chat": lambda: secured.stub.Chat(chat("m"), metadata=metadata),
        "ChatStream": lambda: collect(secured.stub.ChatStream(chat_stream("m"), metadata=metadata)),
        "Embed": lambda: secured.stub.Embed(pb.EmbedRequest(model="m", inputs=["x"]), metadata=metadata),
        "ListModels": lambda: secured.stub.ListModels(pb.ListModelsRequest(), metadata=metadata),
    }
    error = await expect_error(calls[rpc]())
    assert (error.code, error.info.reason) == (code, reason)
    assert GOOD not in error.message and "wrong-key" not in error.message
    assert not openai_upstream.requests


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((("authorization", "Bearer wrong-key"), ("x-api-key", GOOD)), id="wrong-then-good"),
        pytest.param((("x-api-key", GOOD), ("authorization", "Bearer wrong-key")), id="good-then-wrong"),
        pytest.param((("authorization", f"Bearer {GOOD}"), ("authorization", f"Bearer {GOOD}")), id="good-twice"),
    ],
)
async def test_ambiguous_credentials_are_refused(
    secured: Gateway, openai_upstream: OpenAIEmulator, metadata: Any
) -> None:
    """Found from outside: the first credential won (wrong-then-good refused, good-then-wrong
    admitted). The rule now: exactly one credential, else UNAUTHENTICATED."""
    error = await expect_error(secured.stub.Chat(chat("m"), metadata=metadata))
    assert (error.code, error.info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")
    assert "more than one credential" in error.message
    assert not openai_upstream.requests


async def test_model_not_allowed(secured: Gateway, openai_upstream: OpenAIEmulator) -> None:
    error = await expect_error(secured.stub.Chat(chat("m"), metadata=bearer(OTHER)))
    assert (error.code, error.info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED")
    assert error.info.metadata["key_id"] == "beta" and error.info.metadata["model"] == "m"
    fallback = pb.RoutingOptions(fallback_models=["claude-haiku-4-5"])
    error = await expect_error(secured.stub.Chat(chat("gpt-4o-mini", routing=fallback), metadata=bearer(OTHER)))
    assert error.info.reason == "MODEL_NOT_ALLOWED" and error.info.metadata["model"] == "claude-haiku-4-5"
    assert (await secured.stub.Chat(chat("gpt-4o-mini"), metadata=bearer(OTHER))).provider == "openai"
    assert len(openai_upstream.requests) == 1


async def test_health_and_reflection_need_no_key(secured: Gateway) -> None:
    health = health_pb2_grpc.HealthStub(secured.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    call = reflection_pb2_grpc.ServerReflectionStub(secured.channel).ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    await call.done_writing()
    reply = await call.read()
    assert "llm_gateway.v1.LLMGatewayService" in {s.name for s in reply.list_services_response.service}


async def test_no_keys_refuses_non_loopback_unless_disabled(make_gateway: GatewayFactory) -> None:
    with pytest.raises(ConfigError, match=r"refusing to serve on 0\.0\.0\.0"):
        await make_gateway({}, host="0.0.0.0")
    gateway = await make_gateway({}, host="0.0.0.0", auth={"disabled": True}, tls={"allow_plaintext": True})
    assert (await gateway.stub.ListModels(pb.ListModelsRequest())).total_size > 0


def test_hash_key_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llm_gateway_server", "hash-key"],
        input=GOOD + "\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert result.stdout.strip() == hash_key(GOOD)


async def test_no_log_line_contains_a_gateway_or_provider_key(openai_upstream: OpenAIEmulator, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    keys_yaml = "\n".join(f"    - {{id: '{k['id']}', key_sha256: {k['key_sha256']}}}" for k in KEYS)
    config.write_text(f"auth:\n  keys:\n{keys_yaml}\nlog_level: debug\nmetrics_port: 0\n")
    env = {"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": openai_upstream.base_url}
    process = subprocess.Popen(  # noqa: ASYNC220 - a real process, so its stdout is the real log stream
        [sys.executable, "-m", "llm_gateway_server", "serve", "--port", str(port), "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), 20)
            except TimeoutError:
                process.kill()
                pytest.fail(f"gateway did not start: {process.communicate()[0]}")
            stub = pb_grpc.LLMGatewayServiceStub(channel)
            await stub.Chat(chat("m"), metadata=bearer(GOOD))
            for model in ("status-401", "status-500"):  # upstream errors are logged with their details
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Chat(chat(model), metadata=bearer(GOOD))
            for metadata in (bearer("wrong-secret-key-123"), (("x-api-key", "another-secret-456"),)):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Chat(chat("m"), metadata=metadata)
        process.terminate()
        output, _ = await asyncio.to_thread(process.communicate, timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert sum('"event": "rpc"' in line for line in lines) == 5
    assert any('"upstream_status": "401"' in line for line in lines)
    for secret in (GOOD, OPENAI_TEST_KEY, "wrong-secret-key-123", "another-secret-456", "sk-abc"):
        assert secret not in output, secret
