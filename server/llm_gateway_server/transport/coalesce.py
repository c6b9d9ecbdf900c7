"""Delta coalescing for server streams: fewer, larger gRPC messages when deltas arrive faster than
the client connection takes them, and no added latency when they do not.

A gRPC message costs the gateway ~70-90 µs of CPU whatever its size (bench/NOTES.md: a bare
grpc.aio server on this machine), while parsing an upstream chunk costs ~25 µs. Upstreams often
deliver several chunks in one TCP read (a fast model, a provider that batches tokens, a network
hiccup). `coalesced` runs the router's stream in a pump task; each time the writer is ready for
the next message it takes every delta already waiting and sends them as one. The first delta
is never held back: a delta waits only while the previous message is being written.

Merging is lossless: texts are concatenated; tool-call fragments keep their order, and a
fragment that continues the previous one (same index, no id or name) has its arguments appended
to it. Deltas of different deployments are never merged (they cannot be: one stream has one).
"""

from __future__ import annotations

import asyncio
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


async def coalesced(events: AsyncIterator[ChatStreamEvent]) -> AsyncIterator[ChatStreamEvent]:
    """Yields `events` in order, merging the deltas that are already waiting at each step.

    Errors raised by `events` are raised here after every event that preceded them. Closing or
    cancelling this generator cancels the pump, which closes `events` (and so the upstream call).
    """
    queue: asyncio.Queue[ChatStreamEvent | _End] = asyncio.Queue(MAX_BACKLOG)

    async def pump() -> None:
        try:
            async for event in events:
                await queue.put(event)
        except Exception as exc:  # noqa: BLE001 - handed to the writer, raised there in order
            await queue.put(_End(exc))
            return
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        await queue.put(_End(None))

    task = asyncio.create_task(pump())
    held: ChatStreamEvent | _End | None = None
    try:
        while True:
            item = held if held is not None else await queue.get()
            held = None
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            if not isinstance(item, ChatStreamDelta):
                yield item
                continue
            batch = [item]
            while not queue.empty():
                waiting = queue.get_nowait()
                if isinstance(waiting, ChatStreamDelta) and (waiting.model, waiting.provider) == (
                    item.model,
                    item.provider,
                ):
                    batch.append(waiting)
                else:
                    held = waiting
                    break
            yield merge_deltas(batch)
    finally:
        if not task.done():
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this generator's own task is being cancelled: let it be
