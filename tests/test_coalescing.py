"""Delta coalescing (transport/coalesce.py): deltas that wait while the previous message is being
written go out as one message; nothing is lost, reordered or held back.

Through the real server and the OpenAI emulator, plus a property test of the merge itself."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway_server.domain import (
    ChatDelta,
    ChatStreamDelta,
    ChatStreamEvent,
    ChatStreamFinal,
    Cost,
    FinishReason,
    ToolCallDelta,
    Usage,
)
from llm_gateway_server.errors import GatewayError
from llm_gateway_server.providers.errors import connection_failed
from llm_gateway_server.transport.coalesce import coalesced, merge_deltas

from .conftest import OPENAI_TEST_KEY, Gateway, GatewayFactory, chat_stream, collect
from .emulators.openai_server import OpenAIEmulator


@pytest.fixture
async def gateway(make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator) -> Gateway:
    """Production defaults: coalescing on."""
    return await make_gateway({"OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": openai_upstream.base_url})


def _deltas(messages: list[pb.ChatStreamResponse]) -> list[pb.ChatStreamResponse]:
    return [m for m in messages if m.WhichOneof("event") == "delta"]


async def test_a_burst_is_merged_without_loss(gateway: Gateway) -> None:
    # The emulator writes its three text chunks back to back: they arrive in one read.
    messages = await collect(gateway.stub.ChatStream(chat_stream("m", "Hello there")))
    deltas = _deltas(messages)
    assert "".join(d.delta.text for d in deltas) == "echo: Hello there"
    assert len(deltas) < 3, "chunks that arrive together are sent as fewer messages"
    assert messages[-1].final.usage.total_tokens == 18 and messages[-1].final.finish_reason == pb.FINISH_REASON_STOP


async def test_tool_call_fragments_merge_into_their_call(gateway: Gateway) -> None:
    messages = await collect(gateway.stub.ChatStream(chat_stream("tools", tools=[pb.Tool(name="get_weather")])))
    fragments = [f for d in _deltas(messages) for f in d.delta.tool_calls]
    joined = "".join(f.arguments for f in fragments)
    assert json.loads(joined) == {"city": "Paris"}
    assert fragments[0].id == "call_emul_1" and fragments[0].name == "get_weather"
    assert len(fragments) < 4
    final = messages[-1].final
    assert [(c.id, c.name, json.loads(c.arguments)) for c in final.tool_calls] == [
        ("call_emul_1", "get_weather", {"city": "Paris"})
    ]


async def test_paced_chunks_are_not_held_back(gateway: Gateway) -> None:
    # 40 ms between upstream chunks: each delta is written before the next one exists.
    deltas = _deltas(await collect(gateway.stub.ChatStream(chat_stream("paced-40", "Hello there"))))
    assert [d.delta.text for d in deltas] == ["echo:", " Hello", " there"]


async def test_content_before_an_upstream_error_still_reaches_the_client(gateway: Gateway) -> None:
    received: list[pb.ChatStreamResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in gateway.stub.ChatStream(chat_stream("stream-error", "Hello there")):
            received.append(message)
    assert [m.delta.text for m in received] == ["echo:"]
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_cancelling_the_client_closes_the_upstream(gateway: Gateway, openai_upstream: OpenAIEmulator) -> None:
    call = gateway.stub.ChatStream(chat_stream("stall-stream", "Hello there"))
    first = await call.read()
    assert first.delta.text == "echo:"
    call.cancel()
    for _ in range(100):
        if openai_upstream.disconnects:
            break
        await asyncio.sleep(0.02)
    assert openai_upstream.disconnects, "the upstream request was closed"


def _delta(text: str, *fragments: ToolCallDelta) -> ChatStreamDelta:
    return ChatStreamDelta(model="m", provider="p", delta=ChatDelta(text, fragments))


_FINAL = ChatStreamFinal(
    model="m",
    provider="p",
    finish_reason=FinishReason.STOP,
    provider_finish_reason="stop",
    usage=Usage(1, 1),
    cost=Cost(),
    tool_calls=(),
    attempts=(),
)


async def _run(events: list[ChatStreamEvent], fail: GatewayError | None = None) -> list[ChatStreamEvent]:
    async def source() -> AsyncIterator[ChatStreamEvent]:
        for event in events:
            yield event
        if fail is not None:
            raise fail

    out: list[ChatStreamEvent] = []
    async for event in coalesced(source()):
        out.append(event)
        await asyncio.sleep(0.01)  # a message being written: what arrives meanwhile waits
    return out


async def test_the_first_event_goes_at_once_and_the_rest_of_a_burst_together() -> None:
    out = await _run([_delta("a"), _delta("b"), _delta("c"), _FINAL])
    assert out == [_delta("a"), _delta("bc"), _FINAL]


async def test_an_error_follows_every_event_before_it() -> None:
    error = connection_failed("p", "m", "dropped")
    with pytest.raises(GatewayError) as caught:
        await _run([_delta("a"), _delta("b")], fail=error)
    assert caught.value is error
    out: list[ChatStreamEvent] = []

    async def source() -> AsyncIterator[ChatStreamEvent]:
        yield _delta("a")
        yield _delta("b")
        raise error

    with pytest.raises(GatewayError):
        async for event in coalesced(source()):
            out.append(event)
            await asyncio.sleep(0.01)
    assert out == [_delta("a"), _delta("b")]


async def test_closing_the_consumer_closes_the_source() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncIterator[ChatStreamEvent]:
        try:
            yield _delta("a")
            await asyncio.sleep(3600)
            yield _delta("never")
        finally:
            closed.set()

    stream = coalesced(source())
    assert await anext(stream) == _delta("a")
    await stream.aclose()  # type: ignore[attr-defined]
    assert closed.is_set()


_fragment = st.builds(
    ToolCallDelta,
    index=st.integers(0, 2),
    id=st.sampled_from(["", "", "call_1"]),
    name=st.sampled_from(["", "", "f"]),
    arguments=st.text(max_size=5),
)


@given(st.lists(st.tuples(st.text(max_size=5), st.lists(_fragment, max_size=3)), min_size=1, max_size=8))
def test_merging_keeps_text_and_each_calls_arguments(parts: list[tuple[str, list[ToolCallDelta]]]) -> None:
    deltas = [_delta(text, *fragments) for text, fragments in parts]
    merged = merge_deltas(deltas).delta
    assert merged.text == "".join(text for text, _ in parts)
    every = [f for _, fragments in parts for f in fragments]
    # The concatenated arguments, the ids and the names, in order, are unchanged.
    assert "".join(f.arguments for f in merged.tool_calls) == "".join(f.arguments for f in every)
    assert [(f.index, f.id, f.name) for f in merged.tool_calls if f.id or f.name] == [
        (f.index, f.id, f.name) for f in every if f.id or f.name
    ]
    for index in range(3):
        assert "".join(f.arguments for f in merged.tool_calls if f.index == index) == "".join(
            f.arguments for f in every if f.index == index
        )
    assert len(merged.tool_calls) <= len(every)
