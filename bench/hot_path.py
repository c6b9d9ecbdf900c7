"""`python bench/hot_path.py`: the gateway's functions on a stream's per-delta path, and how often
each runs per delta.

A gateway (full interceptor chain, coalescing off so that every upstream chunk is one gRPC
message) streams from two `bench/upstream.py` servers, one sending 50 chunks and one 100; under
cProfile, calls per delta of a function = (its calls with 100 chunks − with 50) / 50 / streams.
Functions of the gateway package (`llm_gateway_server`) are listed by name; everything else (grpc,
protobuf, aiohttp, the SDK, asyncio) is summed as "outside the gateway". Deterministic counts, not
times: use it to compare two trees (`PYTHONPATH=<tree>/server:<tree>/clients/python/src`).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STREAMS = 10


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _streams(base_url: str, profile: cProfile.Profile) -> None:
    import grpc  # noqa: PLC0415 - after PYTHONPATH is in place

    from llm_gateway.v1 import llm_gateway_pb2 as pb  # noqa: PLC0415
    from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc  # noqa: PLC0415
    from llm_gateway_server.config import load_settings  # noqa: PLC0415

    try:
        from llm_gateway_server.app import start_server  # noqa: PLC0415
    except ImportError:  # trees from before the composition root
        from llm_gateway_server.transport.server import start_server  # type: ignore[no-redef]  # noqa: PLC0415

    env = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "k"}
    overrides: dict[str, Any] = {
        "port": 0,
        "metrics_port": 0,
        "retry": {"max_attempts": 1},
        "rate_limits": {"default_rpm": 100_000_000, "default_tpm": 1_000_000_000},
        "cache": {"enabled": True},
        "stream_coalescing": False,
        "log_level": "warning",
    }
    running = await start_server(load_settings(environ=env, overrides=overrides), env)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.LLMGatewayServiceStub(channel)

    async def one(i: int) -> int:
        text = f"hot path {time.time_ns()} {i}"
        request = pb.ChatStreamRequest(
            model="bench", messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])]
        )
        return len([event async for event in stub.ChatStream(request)])

    await one(-1)  # warm-up, not profiled
    profile.enable()
    for i in range(STREAMS):
        await one(i)
    profile.disable()
    await channel.close()
    await running.stop()


def _calls(chunks: int) -> dict[tuple[str, str], int]:
    port = _free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "upstream.py"), "--port", str(port), "--chunks", str(chunks)],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        profile = cProfile.Profile()
        asyncio.run(_streams(f"http://127.0.0.1:{port}/v1", profile))
    finally:
        upstream.terminate()
        upstream.wait()
    stats = pstats.Stats(profile)
    out: dict[tuple[str, str], int] = {}
    for (filename, _, name), (_, calls, *_) in stats.stats.items():  # type: ignore[attr-defined]
        key = (filename.split("llm_gateway_server/")[-1] if "llm_gateway_server" in filename else "", name)
        out[key] = out.get(key, 0) + calls
    return out


def main() -> None:
    """Prints the per-delta table (see module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    low, high = _calls(50), _calls(100)
    per_delta = {k: (high.get(k, 0) - low.get(k, 0)) / 50 / STREAMS for k in set(low) | set(high)}
    ours = sorted(((k, v) for k, v in per_delta.items() if k[0] and v >= 0.5), key=lambda kv: (-kv[1], kv[0]))
    outside = sum(v for k, v in per_delta.items() if not k[0])
    print("| gateway function (file: name) | calls per delta |")
    print("|---|---|")
    for (filename, name), value in ours:
        print(f"| {filename}: {name} | {value:.1f} |")
    print(f"| **gateway functions, distinct** | **{len(ours)}** |")
    print(f"| **gateway function calls per delta** | **{sum(v for _, v in ours):.1f}** |")
    print(f"| outside the gateway (grpc, protobuf, aiohttp, SDK, asyncio): calls per delta | {outside:.1f} |")


if __name__ == "__main__":
    main()
