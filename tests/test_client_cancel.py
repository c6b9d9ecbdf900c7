"""Leaving a client's `chat_stream` early cancels the RPC at once, so the server sees it.

Each test drives a real gRPC server (a `grpc.aio` server for the asyncio client, a sync
`grpc.server` on a thread pool for the blocking client) whose test servicer streams deltas slowly
forever and records when its call ends and whether the client cancelled it. Where a test holds a
reference to the stream, garbage collection cannot be what ends the call: the cancellation has to
come from the stream's `close()` / `aclose()` / `cancel()` / context-manager exit.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc
from llm_gateway_client import AsyncGatewayClient, GatewayCallError, GatewayClient

TICK_S = 0.05  # the servicer's delay between deltas
PROMPT_S = 1.0  # how soon the server must see a cancellation
DEADLINE_S = 30.0  # the clients' deadline: far beyond PROMPT_S, so a deadline never looks like a cancel


@dataclass
class Probe:
    """What the servicer saw of one ChatStream call."""

    ended: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    sent: int = 0


class Recorder:
    """The probes of every call, in arrival order (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.probes: list[Probe] = []

    def new(self) -> Probe:
        probe = Probe()
        with self._lock:
            self.probes.append(probe)
        return probe

    def only(self) -> Probe:
        with self._lock:
            assert len(self.probes) == 1, self.probes
            return self.probes[0]


def delta(i: int) -> pb.ChatStreamResponse:
    return pb.ChatStreamResponse(id="s1", delta=pb.ChatDelta(text=f"d{i} "))


class EndlessAioServicer(pb_grpc.LLMGatewayServiceServicer):
    """grpc.aio: yields a delta every TICK_S forever; model "stall" yields one and then waits;
    model "fail" aborts with NOT_FOUND."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def ChatStream(self, request: pb.ChatStreamRequest, context: grpc.aio.ServicerContext) -> Any:
        probe = self.recorder.new()
        context.add_done_callback(lambda _ctx: probe.ended.set())
        if request.model == "fail":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        i = 0
        try:
            while True:
                yield delta(i)
                probe.sent = i = i + 1
                await asyncio.sleep(3600 if request.model == "stall" else TICK_S)
        except asyncio.CancelledError:
            # grpc.aio cancels the handler when the client cancels (`context.cancelled()` stays
            # False in grpcio 1.85 even then, so it cannot be the witness).
            probe.cancelled = True
            probe.ended.set()
            raise


class EndlessSyncServicer(pb_grpc.LLMGatewayServiceServicer):
    """The sync twin of EndlessAioServicer (one handler thread per call)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def ChatStream(self, request: pb.ChatStreamRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        probe = self.recorder.new()

        def done() -> None:
            # The stream never ends by itself and the deadline is DEADLINE_S away: an end within
            # PROMPT_S is the client's cancellation (the sync context has no `cancelled()`).
            probe.cancelled = True
            probe.ended.set()

        context.add_callback(done)
        if request.model == "fail":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        i = 0
        while context.is_active():
            yield delta(i)
            probe.sent = i = i + 1
            pause = time.monotonic() + (3600 if request.model == "stall" else TICK_S)
            while context.is_active() and time.monotonic() < pause:
                time.sleep(0.01)


@pytest.fixture
async def aio_server() -> AsyncIterator[tuple[str, Recorder]]:
    recorder = Recorder()
    server = grpc.aio.server()
    pb_grpc.add_LLMGatewayServiceServicer_to_server(EndlessAioServicer(recorder), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", recorder
    await server.stop(grace=None)


@pytest.fixture
def sync_server() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_LLMGatewayServiceServicer_to_server(EndlessSyncServicer(recorder), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", recorder
    server.stop(grace=None).wait(5)


async def seen_cancelled(recorder: Recorder) -> Probe:
    """Waits (without blocking the loop) up to PROMPT_S for the server to see its call end."""
    probe = recorder.only()
    ended = await asyncio.to_thread(probe.ended.wait, PROMPT_S)
    assert ended, f"the server still streams {PROMPT_S}s after the client left (sent {probe.sent} deltas)"
    assert probe.cancelled
    return probe


def seen_cancelled_sync(recorder: Recorder) -> Probe:
    probe = recorder.only()
    assert probe.ended.wait(PROMPT_S), (
        f"the server still streams {PROMPT_S}s after the client left (sent {probe.sent} deltas)"
    )
    assert probe.cancelled
    return probe


# --- asyncio client -----------------------------------------------------------------------------


async def test_async_break_then_aclose_cancels_at_once(aio_server: tuple[str, Recorder]) -> None:
    target, recorder = aio_server
    async with AsyncGatewayClient(target, timeout_s=DEADLINE_S) as client:
        stream = client.chat_stream("m", "Hi")  # held: GC cannot be what closes it
        async for event in stream:
            assert event.delta.text == "d0 "
            break
        await stream.aclose()
        await seen_cancelled(recorder)
        assert [e async for e in stream] == []  # a closed stream yields nothing more
        assert stream is not None


async def test_async_context_manager_cancels_on_exit(aio_server: tuple[str, Recorder]) -> None:
    target, recorder = aio_server
    async with AsyncGatewayClient(target, timeout_s=DEADLINE_S) as client:
        async with client.chat_stream("m", "Hi") as stream:
            async for _ in stream:
                break
            assert not recorder.only().ended.is_set()  # still streaming inside the block
        await seen_cancelled(recorder)
        assert stream is not None


async def test_async_cancel_method_cancels(aio_server: tuple[str, Recorder]) -> None:
    target, recorder = aio_server
    async with AsyncGatewayClient(target, timeout_s=DEADLINE_S) as client:
        stream = client.chat_stream("m", "Hi")
        async for _ in stream:
            break
        assert stream.cancel() is True
        await seen_cancelled(recorder)
        assert stream.cancel() is False  # already over


async def test_async_plain_break_cancels_at_once(aio_server: tuple[str, Recorder]) -> None:
    """`async for ... break` on an unreferenced stream: no aclose() needed, no wait for the
    cyclic garbage collector."""
    target, recorder = aio_server
    async with AsyncGatewayClient(target, timeout_s=DEADLINE_S) as client:
        async for _ in client.chat_stream("m", "Hi"):
            break
        await seen_cancelled(recorder)


async def test_async_consumer_task_cancelled_cancels(aio_server: tuple[str, Recorder]) -> None:
    """An exception out of the iteration (here the consuming task's CancelledError while it waits
    for the next event) cancels the RPC, even with the stream still referenced."""
    target, recorder = aio_server
    async with AsyncGatewayClient(target, timeout_s=DEADLINE_S) as client:
        stream = client.chat_stream("stall", "Hi")
        first = asyncio.Event()

        async def consume() -> None:
            async for _ in stream:
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await seen_cancelled(recorder)
        assert stream is not None


async def test_async_cancel_from_another_task_ends_the_loop(aio_server: tuple[str, Recorder]) -> None:
    """`cancel()` from another task while the consumer waits for the next event: the server sees
    the cancellation and the consumer's loop ends quietly (no CancelledError, no CANCELLED)."""
    target, recorder = aio_server
    async with AsyncGatewayClient(target, timeout_s=DEADLINE_S) as client:
        stream = client.chat_stream("stall", "Hi")
        events = []
        async for event in stream:
            events.append(event)
            asyncio.get_running_loop().call_later(0.2, stream.cancel)
        assert [e.delta.text for e in events] == ["d0 "]
        await seen_cancelled(recorder)


async def test_async_stream_errors_still_decode(aio_server: tuple[str, Recorder]) -> None:
    target, _ = aio_server
    async with AsyncGatewayClient(target, timeout_s=DEADLINE_S) as client:
        with pytest.raises(GatewayCallError) as caught:
            async for _ in client.chat_stream("fail", "Hi"):
                pass
        assert caught.value.code == grpc.StatusCode.NOT_FOUND


# --- blocking client ----------------------------------------------------------------------------


def test_sync_plain_break_cancels_at_once(sync_server: tuple[str, Recorder]) -> None:
    target, recorder = sync_server
    with GatewayClient(target, timeout_s=DEADLINE_S) as client:
        for _ in client.chat_stream("m", "Hi"):
            break
        seen_cancelled_sync(recorder)


def test_sync_context_manager_cancels_on_exit(sync_server: tuple[str, Recorder]) -> None:
    target, recorder = sync_server
    with GatewayClient(target, timeout_s=DEADLINE_S) as client:
        with client.chat_stream("m", "Hi") as stream:  # held until the end of the test
            for event in stream:
                assert event.delta.text == "d0 "
                break
            assert not recorder.only().ended.is_set()  # still streaming inside the block
        seen_cancelled_sync(recorder)
        assert list(stream) == []  # a closed stream yields nothing more


def test_sync_break_then_close_cancels_at_once(sync_server: tuple[str, Recorder]) -> None:
    target, recorder = sync_server
    with GatewayClient(target, timeout_s=DEADLINE_S) as client:
        stream = client.chat_stream("m", "Hi")
        for _ in stream:
            break
        stream.close()
        seen_cancelled_sync(recorder)
        assert stream is not None


def test_sync_exception_in_with_block_cancels(sync_server: tuple[str, Recorder]) -> None:
    target, recorder = sync_server
    with GatewayClient(target, timeout_s=DEADLINE_S) as client:
        with pytest.raises(RuntimeError), client.chat_stream("m", "Hi") as stream:
            for _ in stream:
                raise RuntimeError("consumer failed")
        seen_cancelled_sync(recorder)
        assert stream is not None


def test_sync_cancel_from_another_thread_ends_the_loop(sync_server: tuple[str, Recorder]) -> None:
    """`cancel()` from another thread while the consumer blocks for the next event: the server
    sees the cancellation and the consumer's loop ends quietly (no CANCELLED error)."""
    target, recorder = sync_server
    with GatewayClient(target, timeout_s=DEADLINE_S) as client:
        stream = client.chat_stream("stall", "Hi")
        events = []
        for event in stream:
            events.append(event)
            threading.Timer(0.2, stream.cancel).start()
        assert [e.delta.text for e in events] == ["d0 "]
        seen_cancelled_sync(recorder)


def test_sync_stream_errors_still_decode(sync_server: tuple[str, Recorder]) -> None:
    target, _ = sync_server
    with GatewayClient(target, timeout_s=DEADLINE_S) as client, pytest.raises(GatewayCallError) as caught:
        list(client.chat_stream("fail", "Hi"))
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
