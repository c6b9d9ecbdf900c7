"""A fast loopback OpenAI-compatible upstream for benchmarks (never the bottleneck).

Raw asyncio HTTP/1.1 with keep-alive and precomputed bodies: `POST /v1/chat/completions` (JSON, or
an SSE stream of `--chunks` chunks with `--chunk-delay-ms` between them, chunked transfer encoding)
and `POST /v1/embeddings`. Run it in its own process:

    python bench/upstream.py --port 8199 --chunks 50 --chunk-delay-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import json

_CHAT = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }
).encode()
_EMBED = json.dumps(
    {
        "object": "list",
        "model": "bench",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1] * 16}],
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
).encode()


def _json_response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse_frames(chunks: int) -> list[bytes]:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "bench"}
    frames = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    frames += [
        {**base, "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]}
        for i in range(chunks)
    ]
    frames.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    frames.append(
        {
            **base,
            "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks},
        }
    )
    encoded = [_chunk(b"data: " + json.dumps(f).encode() + b"\n\n") for f in frames]
    encoded.append(_chunk(b"data: [DONE]\n\n"))
    return encoded


class _Upstream(asyncio.Protocol):
    def __init__(self, chunks: list[bytes], delay_s: float) -> None:
        self._frames = chunks
        self._delay_s = delay_s
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self._buffer[:end].lower()
            marker = head.find(b"content-length:")
            length = (
                int(head[marker + 15 : head.find(b"\r\n", marker) if head.find(b"\r\n", marker) > 0 else None])
                if marker >= 0
                else 0
            )
            if len(self._buffer) < end + 4 + length:
                return
            body = self._buffer[end + 4 : end + 4 + length]
            path = head.split(b" ", 2)[1]
            self._buffer = self._buffer[end + 4 + length :]
            self._respond(path, body)

    def _respond(self, path: bytes, body: bytes) -> None:
        assert self._transport is not None
        if path.endswith(b"/embeddings"):
            self._transport.write(_json_response(_EMBED))
        elif b'"stream":true' in body.replace(b" ", b""):
            head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            if self._delay_s:
                task = asyncio.ensure_future(self._stream_slowly(head))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                self._transport.write(head + b"".join(self._frames) + b"0\r\n\r\n")
        else:
            self._transport.write(_json_response(_CHAT))

    async def _stream_slowly(self, head: bytes) -> None:
        transport = self._transport
        assert transport is not None
        transport.write(head)
        for frame in self._frames:
            if transport.is_closing():
                return
            transport.write(frame)
            await asyncio.sleep(self._delay_s)
        transport.write(b"0\r\n\r\n")


async def serve(port: int, chunks: int, delay_ms: float) -> None:
    """Serves until cancelled."""
    frames = _sse_frames(chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Upstream(frames, delay_ms / 1000.0), "127.0.0.1", port, backlog=4096)
    print(f"bench upstream on 127.0.0.1:{port} ({chunks} chunks, {delay_ms} ms apart)", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port, args.chunks, args.chunk_delay_ms))


if __name__ == "__main__":
    main()
