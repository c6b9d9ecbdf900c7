"""A correct drain, on the real CLI: SIGTERM → health NOT_SERVING at once (open Watch streams get
it and end), new calls still accepted during the pre-stop delay, in-flight streams finish with
their final event, and the process exits 0 as soon as its work is done — within pre-stop delay +
grace period + 1 s."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc

from .conftest import FAST_RECONNECT, GATEWAY_PROCESSES, chat, chat_stream, free_port
from .emulators.openai_server import OpenAIEmulator

pytestmark = GATEWAY_PROCESSES

PRESTOP_S = 1.0
GRACE_S = 5.0
STREAMS = 50


@pytest.fixture
async def served(openai_upstream: OpenAIEmulator) -> AsyncIterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    env = {
        **os.environ,
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": openai_upstream.base_url,
        "LLM_GATEWAY_METRICS_PORT": "0",
        "LLM_GATEWAY_PRESTOP_DELAY_S": str(PRESTOP_S),
        "LLM_GATEWAY_GRACE_PERIOD_S": str(GRACE_S),
        "LLM_GATEWAY_RETRY__MAX_ATTEMPTS": "1",
    }
    process = subprocess.Popen(  # noqa: ASYNC220 - the real process is the point
        [sys.executable, "-m", "llm_gateway_server", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT) as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


async def test_sigterm_drains_streams_and_exits_when_done(served: tuple[subprocess.Popen[bytes], int]) -> None:
    process, port = served
    target = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(target) as channel, grpc.aio.insecure_channel(target) as probe:
        stub = pb_grpc.LLMGatewayServiceStub(channel)
        health = health_pb2_grpc.HealthStub(probe)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        # 50 streams paced 700 ms per chunk: each runs about 4.4 s, well past the 1 s pre-stop delay
        calls = [stub.ChatStream(chat_stream("paced-700", f"s{i}")) for i in range(STREAMS)]
        firsts = await asyncio.gather(*(c.read() for c in calls))
        assert all(f.WhichOneof("event") == "delta" for f in firsts)

        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while True:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.005)
        not_serving_s = time.monotonic() - signalled
        assert not_serving_s < 0.1, f"NOT_SERVING after {not_serving_s * 1000:.0f} ms"
        # the open Watch got NOT_SERVING and ended (it does not hold the shutdown)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await watch.read() is grpc.aio.EOF
        assert await watch.code() is grpc.StatusCode.OK
        # a new call during the pre-stop delay is still served
        reply = await asyncio.wait_for(stub.Chat(chat("m", "during prestop")), PRESTOP_S)
        assert reply.message.content[0].text == "echo: during prestop"

        async def rest(call: object) -> list[object]:
            events = []
            while (event := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                events.append(event)
            return events

        ends = await asyncio.gather(*(rest(c) for c in calls))
        work_done = time.monotonic()
        assert all(events and events[-1].WhichOneof("event") == "final" for events in ends)  # type: ignore[attr-defined]

    code = await asyncio.to_thread(process.wait, PRESTOP_S + GRACE_S + 5)
    exited_s = time.monotonic() - signalled
    assert code == 0
    assert exited_s <= PRESTOP_S + GRACE_S + 1, f"exit {exited_s:.2f} s after SIGTERM"
    after_work_s = time.monotonic() - work_done
    assert after_work_s < 1.0, f"exit {after_work_s:.2f} s after the last stream ended: it waited for more"
    print(
        f"drain: NOT_SERVING after {not_serving_s * 1000:.1f} ms; {STREAMS} streams ended with their final "
        f"event; exit 0 after {exited_s:.2f} s ({after_work_s:.2f} s after the last stream)"
    )
