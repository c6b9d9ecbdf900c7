"""Delta coalescing for server streams: fewer, larger gRPC messages when deltas arrive faster than
the client connection takes them, and no added latency when they do not.

A gRPC message costs the gateway far more CPU than parsing an upstream chunk, whatever its size
(figures in bench/NOTES.md). Upstreams often
deliver several chunks in one TCP read (a fast model, a provider that batches tokens, a network
hiccup). `coalesced` runs the router's stream in a pump task; each time the writer is ready for
the next message it takes every delta already waiting and sends them as one. A delta is never
held back for a later one: it waits only while the previous message is being written.

Merging is lossless: texts are concatenated; tool-call fragments keep their order, and a
fragment that continues the previous one (same index, no id or name) has its arguments appended
to it. One stream comes from one deployment, so its deltas share model and provider.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from ..domain import ChatDelta, ChatStreamDelta, ChatStreamEvent, ToolCallDelta

# Events the pump may run ahead of the writer before it waits (bounds memory per stream).
MAX_BACKLOG = 512


class _End:
    """The pump's last item: the stream ended, normally (`error` None) or with `error`."""

    __slots__ = ("error",)

    def __init__(self, error: Exception | None) -> None:
        self.error = error


def merge_deltas(deltas: list[ChatStreamDelta]) -> ChatStreamDelta:
    """One delta equal to `deltas` in order (≥ 1 of them, same model and provider)."""
    if len(deltas) == 1:
        return deltas[0]
    fragments: list[ToolCallDelta] = []
    for item in deltas:
        for fragment in item.delta.tool_calls:
            last = fragments[-1] if fragments else None
            if last is not None and last.index == fragment.index and not fragment.id and not fragment.name:
                fragments[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + fragment.arguments)
            else:
                fragments.append(fragment)
    first = deltas[0]
    text = "".join(item.delta.text for item in deltas)
    return ChatStreamDelta(model=first.model, provider=first.provider, delta=ChatDelta(text, tuple(fragments)))


class _Pipe:
    """Events from the pump to the writer: a deque, the writer's wake-up future while it waits
    for an event, and the pump's while the backlog is full."""

    __slots__ = ("items", "reader", "writer")

    def __init__(self) -> None:
        self.items: deque[ChatStreamEvent | _End] = deque()
        self.reader: asyncio.Future[None] | None = None  # the writer waits for an event
        self.writer: asyncio.Future[None] | None = None  # the pump waits for room

    @staticmethod
    def wake(future: asyncio.Future[None] | None) -> None:
        if future is not None and not future.done():
            future.set_result(None)


async def coalesced(events: AsyncIterator[ChatStreamEvent]) -> AsyncIterator[ChatStreamEvent]:
    """Yields `events` in order, merging the deltas that are already waiting at each step.

    When the writer is idle, an event is handed over at once (the pump yields to it before
    parsing on), so the first delta of a burst is not delayed by the rest of the burst. Errors
    raised by `events` are raised here after every event that preceded them. Closing or
    cancelling this generator cancels the pump, which closes `events` (and so the upstream call).
    """
    loop = asyncio.get_running_loop()
    pipe = _Pipe()

    async def put(item: ChatStreamEvent | _End) -> None:
        pipe.items.append(item)
        if pipe.reader is not None:  # the writer is idle: let it take this now
            pipe.wake(pipe.reader)
            pipe.reader = None
            await asyncio.sleep(0)
        elif len(pipe.items) >= MAX_BACKLOG:
            pipe.writer = loop.create_future()
            await pipe.writer

    async def pump() -> None:
        end = _End(None)
        try:
            async for event in events:
                await put(event)
        except Exception as exc:  # noqa: BLE001 - handed to the writer, raised there in order
            end = _End(exc)
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        await put(end)

    task = asyncio.create_task(pump())
    try:
        while True:
            if not pipe.items:
                pipe.reader = loop.create_future()
                await pipe.reader
            item = pipe.items.popleft()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            if isinstance(item, ChatStreamDelta):
                batch = [item]
                while pipe.items and isinstance(pipe.items[0], ChatStreamDelta):
                    batch.append(pipe.items.popleft())  # type: ignore[arg-type]  # checked just above
                item = merge_deltas(batch)
            pipe.wake(pipe.writer)
            pipe.writer = None
            yield item
    finally:
        if not task.done():
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this generator's own task is being cancelled: let it be
