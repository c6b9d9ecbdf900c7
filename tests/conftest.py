"""Shared fixtures: loopback provider emulators, the real grpc.aio gateway on 127.0.0.1:0, and
async generated stubs.

The gateway under test is the real server (`app.start_server`: servicer, health,
reflection) driven through `llm_gateway.v1` stubs over a real channel, from pytest-asyncio
fixtures. pytest-grpc (named in the design card) only runs synchronous `grpc.server` servicers,
so it is used where that fits: `test_client_sync.py` runs the shipped sync client against a sync
test servicer with it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc
from llm_gateway_server.app import RunningServer, start_server
from llm_gateway_server.config import load_settings

from .emulators.ollama_server import OllamaEmulator
from .emulators.openai_server import OpenAIEmulator

OPENAI_TEST_KEY = "sk-test-0123456789abcdefSECRET"


@dataclass
class Gateway:
    """A running gateway and a stub connected to it."""

    running: RunningServer
    channel: grpc.aio.Channel
    stub: pb_grpc.LLMGatewayServiceStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"


@pytest.fixture
async def openai_upstream() -> AsyncIterator[OpenAIEmulator]:
    emulator = OpenAIEmulator()
    await emulator.start()
    yield emulator
    await emulator.stop()


@pytest.fixture
async def ollama_upstream() -> AsyncIterator[OllamaEmulator]:
    emulator = OllamaEmulator()
    await emulator.start()
    yield emulator
    await emulator.stop()


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    """Factory: `await make_gateway(environ, **settings_overrides)` starts a gateway on port 0."""
    started: list[Gateway] = []

    async def make(environ: dict[str, str], **overrides: Any) -> Gateway:
        # One attempt per deployment unless a test asks for retries: adapter tests count upstream
        # calls to show the SDKs' own retries are off (tests/test_resilience.py covers retries).
        defaults = {"port": 0, "grace_period_s": 0.5, "retry": {"max_attempts": 1}, "metrics_port": 0}
        settings = load_settings(environ=environ, overrides={**defaults, **overrides})
        running = await start_server(settings, environ)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        gateway = Gateway(running, channel, pb_grpc.LLMGatewayServiceStub(channel))
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.channel.close()
        await gateway.running.stop()


@pytest.fixture
async def gateway(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, ollama_upstream: OllamaEmulator
) -> Gateway:
    """A gateway with an OpenAI-compatible provider and an Ollama provider on the emulators,
    configured only through the SDKs' standard environment variables."""
    return await make_gateway(
        {
            "OPENAI_API_KEY": OPENAI_TEST_KEY,
            "OPENAI_BASE_URL": openai_upstream.base_url,
            "OLLAMA_HOST": ollama_upstream.host,
        }
    )


def user(text: str) -> pb.Message:
    """A user message with one text part."""
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


def chat(model: str, text: str = "Hi", **fields: Any) -> pb.ChatRequest:
    return pb.ChatRequest(model=model, messages=[user(text)], **fields)


def chat_stream(model: str, text: str = "Hi", **fields: Any) -> pb.ChatStreamRequest:
    return pb.ChatStreamRequest(model=model, messages=[user(text)], **fields)


@dataclass
class RichError:
    """A failed call's status and its `google.rpc.Status` details."""

    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo
    retry: error_details_pb2.RetryInfo | None
    bad_request: error_details_pb2.BadRequest | None
    trailers: dict[str, str]


def rich_error(error: grpc.aio.AioRpcError) -> RichError:
    """Decodes a failed call; asserts exactly one ErrorInfo is present."""
    trailers = error.trailing_metadata() or ()
    raw = next(v for k, v in trailers if k == "grpc-status-details-bin")
    status = status_pb2.Status.FromString(raw)
    assert status.code == error.code().value[0]
    infos, retry, bad = [], None, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
    assert len(infos) == 1, status
    assert infos[0].domain == "llm-gateway"
    return RichError(
        error.code(), error.details() or "", infos[0], retry, bad, {k: v for k, v in trailers if isinstance(v, str)}
    )


async def expect_error(call: Awaitable[Any]) -> RichError:
    """Awaits a call that must fail and returns its decoded status."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return rich_error(caught.value)


async def collect(call: Any) -> list[pb.ChatStreamResponse]:
    """All messages of a server stream."""
    return [message async for message in call]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A throwaway `redis-server` on a free loopback port."""

    process: Any
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def redis_server() -> Any:
    """Starts a real redis-server (no persistence) for the test and stops it afterwards."""
    import shutil
    import subprocess
    import time

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (Debian package redis-server); Redis features need a real server")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    server = RedisServer(process, port)
    yield server
    if process.poll() is None:
        server.kill()
