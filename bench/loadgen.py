"""Load generation: fixed concurrency, bounded by count and time, through the generated gRPC stubs
(the gateway) or the official openai SDK (the direct call to the upstream: the zero-overhead limit).

Results are latencies (s) and, for streams, times to first token (s).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import openai

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc


@dataclass
class Result:
    """What one run measured."""

    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed_s: float = 0.0

    @property
    def calls(self) -> int:
        return len(self.latencies)

    def pct(self, q: float, values: list[float] | None = None) -> float:
        """The q-quantile (0..1) in milliseconds."""
        data = sorted(self.latencies if values is None else values)
        if not data:
            return float("nan")
        return data[min(int(q * len(data)), len(data) - 1)] * 1000.0

    @property
    def throughput(self) -> float:
        return self.calls / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def ttft_p50(self) -> float:
        return statistics.median(self.ttfts) * 1000.0 if self.ttfts else float("nan")


Call = Callable[[int], Awaitable[float | None]]  # returns time to first token for streams


async def drive(call: Call, concurrency: int, count: int, max_s: float) -> Result:
    """Runs `call(i)` with `concurrency` workers until `count` calls or `max_s` seconds."""
    result = Result()
    counter = itertools.count()
    deadline = time.perf_counter() + max_s

    async def worker() -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            if i >= count:
                return
            started = time.perf_counter()
            try:
                ttft = await call(i)
            except Exception:  # noqa: BLE001 - counted, the run goes on
                result.errors += 1
                continue
            result.latencies.append(time.perf_counter() - started)
            if ttft is not None:
                result.ttfts.append(ttft - started)

    begin = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - begin
    return result


def _messages(i: int, nonce: str) -> list[pb.Message]:
    """A prompt unique to this call (`nonce` differs per load run), or a fixed one (nonce "")."""
    text = f"benchmark prompt {nonce} {i}" if nonce else "benchmark prompt"
    return [pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])]


def _nonce() -> str:
    """Every load run gets its own prompts, so a cache-enabled gateway sees only misses."""
    return uuid.uuid4().hex[:12]


class GatewayClient:
    """Calls the gateway through the generated stubs, call i on connection i mod `connections`.

    Several connections stand for several client processes: `serve --workers N` shares one port
    with SO_REUSEPORT, which balances connections (not calls) across the workers, so one HTTP/2
    connection would reach one worker only. Each channel gets its own subchannel pool, hence its
    own TCP connection.
    """

    def __init__(self, target: str, api_key: str, connections: int = 8) -> None:
        self.channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(connections)
        ]
        self.stubs = [pb_grpc.LLMGatewayServiceStub(channel) for channel in self.channels]
        self.metadata = (("authorization", f"Bearer {api_key}"),)

    def _stub(self, i: int) -> pb_grpc.LLMGatewayServiceStub:
        return self.stubs[i % len(self.stubs)]

    def chat(self, model: str, unique: bool = True) -> Call:
        nonce = _nonce() if unique else ""

        async def call(i: int) -> None:
            await self._stub(i).Chat(
                pb.ChatRequest(model=model, messages=_messages(i, nonce)), metadata=self.metadata, timeout=30
            )

        return call

    def stream(self, model: str) -> Call:
        nonce = _nonce()

        async def call(i: int) -> float | None:
            first = None
            final = False
            async for event in self._stub(i).ChatStream(
                pb.ChatStreamRequest(model=model, messages=_messages(i, nonce)), metadata=self.metadata, timeout=60
            ):
                if first is None:
                    first = time.perf_counter()
                final = event.WhichOneof("event") == "final"
            if not final:
                raise RuntimeError("stream ended without its final event")
            return first

        return call

    def embed(self, model: str) -> Call:
        nonce = _nonce()

        async def call(i: int) -> None:
            await self._stub(i).Embed(
                pb.EmbedRequest(model=model, inputs=[f"text {nonce} {i}"]), metadata=self.metadata, timeout=30
            )

        return call

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class FloorClient:
    """Calls `bench/grpc_floor.py` (a bare grpc.aio server) through one channel."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self._unary = self.channel.unary_unary("/floor.Floor/Unary")
        self._stream = self.channel.unary_stream("/floor.Floor/Stream")

    def unary(self) -> Call:
        async def call(i: int) -> None:
            await self._unary(b"q" * 100, timeout=30)

        return call

    def stream(self) -> Call:
        async def call(i: int) -> float | None:
            first = None
            async for _ in self._stream(b"q", timeout=30):
                if first is None:
                    first = time.perf_counter()
            return first

        return call

    async def close(self) -> None:
        await self.channel.close()


class DirectClient:
    """Calls the upstream directly with the official openai SDK on the transport the gateway uses
    by default (aiohttp): what an application without the gateway would do."""

    def __init__(self, base_url: str, api_key: str = "bench", model: str = "bench") -> None:
        self.client = openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, http_client=openai.DefaultAioHttpClient()
        )
        self.model = model

    def chat(self) -> Call:
        async def call(i: int) -> None:
            await self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": f"benchmark prompt {i}"}], timeout=30
            )

        return call

    def stream(self) -> Call:
        async def call(i: int) -> float | None:
            first = None
            stream = await self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": f"benchmark prompt {i}"}],
                stream=True,
                stream_options={"include_usage": True},
                timeout=60,
            )
            async for _ in stream:
                if first is None:
                    first = time.perf_counter()
            return first

        return call

    def embed(self) -> Call:
        async def call(i: int) -> None:
            await self.client.embeddings.create(model="bench", input=[f"text {i}"], timeout=30)

        return call

    async def close(self) -> None:
        await self.client.close()
