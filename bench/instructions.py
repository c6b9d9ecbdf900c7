"""`make bench-instructions`: instructions per call, counted by valgrind's callgrind.

Wall-clock and CPU seconds on a shared machine drift by tens of percent between runs; instruction
counts do not (callgrind counts what the process executes, whatever else the machine does). Each
scenario runs a gRPC client and the server in one process against `bench/upstream.py`, once with
N calls and once with none; instructions per call = (difference) / N. Client-side work is included
and is the same for every gateway scenario. Writes `bench/INSTRUCTIONS.md`.

Scenarios: the bare grpc.aio floor (unary, 50-message stream), the gateway with its full chain
(cache hit, unary miss, 50-chunk stream), the gateway without the chain, the adapter's call alone
(its pooled direct HTTP path), the same call through the official SDK's `chat.completions.create`,
and the same HTTP exchange with plain aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key-0123456789"
CHAT_PATH = "/chat/completions"
# The event loop a worker runs ("asyncio" or "uvloop"), passed in its environment.
LOOP_ENV = "LLM_GATEWAY_BENCH_LOOP"
LOOPS = ("uvloop", "asyncio")
# scenario → (calls per measured run, what it is)
SCENARIOS: dict[str, tuple[int, str]] = {
    "floor-unary": (40, "bare grpc.aio unary call (client + server, bytes, no protobuf)"),
    "floor-stream": (20, "bare grpc.aio stream of 50 messages (client + server)"),
    "hit": (40, "gateway, cache hit (full chain)"),
    "unary": (30, "gateway, unary chat, cache miss (full chain)"),
    "unary-bare": (30, "gateway, unary chat without auth, rate limit, cache and info logging"),
    "stream": (20, "gateway, streamed chat of 50 chunks (full chain, coalescing on)"),
    "adapter": (40, "the OpenAI adapter's non-streamed call alone (pooled aiohttp session, direct_http)"),
    "sdk": (40, "the same call with the official SDK: chat.completions.create (aiohttp transport)"),
    "raw": (40, "the same HTTP exchange with plain aiohttp + json (no SDK)"),
}


# --- worker side (runs under valgrind) ------------------------------------------------------------


async def _floor(mode: str, n: int) -> None:
    import grpc  # noqa: PLC0415 - the worker imports only what its scenario needs
    from grpc_floor import build_server  # noqa: PLC0415 - bench/ is this script's directory

    server, port = build_server("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call_unary = channel.unary_unary("/floor.Floor/Unary")
    call_stream = channel.unary_stream("/floor.Floor/Stream")

    async def one() -> None:
        if mode == "floor-unary":
            await call_unary(b"q" * 100, metadata=(("authorization", f"Bearer {KEY}"),))
        else:
            async for _ in call_stream(b"q"):
                pass

    for _ in range(5 + n):
        await one()
    await channel.close()
    await server.stop(0)


async def _gateway(mode: str, n: int, base_url: str) -> None:
    import grpc  # noqa: PLC0415

    from llm_gateway.v1 import llm_gateway_pb2 as pb  # noqa: PLC0415
    from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc  # noqa: PLC0415
    from llm_gateway_server.app import start_server  # noqa: PLC0415
    from llm_gateway_server.config import load_settings  # noqa: PLC0415
    from llm_gateway_server.interceptors.auth import hash_key  # noqa: PLC0415
    from llm_gateway_server.telemetry.logging import configure_logging  # noqa: PLC0415

    configure_logging("info")
    env = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "k"}
    overrides: dict[str, Any] = {
        "port": 0,
        "metrics_port": 0,
        "retry": {"max_attempts": 1},
        "auth": {"keys": [{"id": "bench", "key_sha256": hash_key(KEY)}]},
        "rate_limits": {"default_rpm": 100_000_000, "default_tpm": 1_000_000_000},
        "cache": {"enabled": True},
        # Under valgrind a call takes ~50× its normal time, so the ledger's once-a-second flush would
        # write a batch every few calls; under load batches fill up (`batch_size`). One batch is
        # written at stop instead, so each call carries its share of one batched write.
        "ledger": {"flush_interval_s": 60, "batch_size": 100_000},
    }
    if mode == "unary-bare":
        overrides.update(auth={"disabled": True}, log_level="warning")
        del overrides["rate_limits"], overrides["cache"]
    running = await start_server(load_settings(environ=env, overrides=overrides), env)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.LLMGatewayServiceStub(channel)
    metadata = (("authorization", f"Bearer {KEY}"),)
    nonce = uuid.uuid4().hex

    def messages(text: str) -> list[Any]:
        return [pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])]

    async def one(i: int) -> None:
        if mode == "hit":
            await stub.Chat(pb.ChatRequest(model="bench", messages=messages("fixed")), metadata=metadata)
        elif mode == "stream":
            request = pb.ChatStreamRequest(model="bench", messages=messages(f"s {nonce} {i}"))
            async for _ in stub.ChatStream(request, metadata=metadata):
                pass
        else:
            await stub.Chat(pb.ChatRequest(model="bench", messages=messages(f"u {nonce} {i}")), metadata=metadata)

    for i in range(-5, n):
        await one(i)
    await channel.close()
    await running.stop()


async def _adapter(mode: str, n: int, base_url: str) -> None:
    import aiohttp  # noqa: PLC0415
    import openai  # noqa: PLC0415

    from llm_gateway.v1 import llm_gateway_pb2 as pb  # noqa: PLC0415
    from llm_gateway_server.providers.base import ProviderConfig  # noqa: PLC0415
    from llm_gateway_server.providers.openai_adapter import OpenAIProvider  # noqa: PLC0415
    from llm_gateway_server.transport import convert  # noqa: PLC0415

    provider = OpenAIProvider(ProviderConfig("openai", api_key="k", base_url=base_url, passthrough=True))
    request = convert.chat_request_in(
        pb.ChatRequest(model="bench", messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="hi")])])
    )
    session = aiohttp.ClientSession()
    sdk = openai.AsyncOpenAI(api_key="k", base_url=base_url, max_retries=0, http_client=openai.DefaultAioHttpClient())
    body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}]}

    async def one() -> None:
        if mode == "adapter":
            await provider.chat(request, "bench", 30)
        elif mode == "sdk":
            await sdk.chat.completions.create(model="bench", messages=[{"role": "user", "content": "hi"}], timeout=30)
        else:
            async with session.post(base_url + CHAT_PATH, json=body, headers={"Authorization": "Bearer k"}) as r:
                json.loads(await r.read())

    for _ in range(5 + n):
        await one()
    await provider.aclose()
    await sdk.close()
    await session.close()


def worker(mode: str, n: int, base_url: str) -> None:
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - log lines are written (that is measured), not kept
    if os.environ.get(LOOP_ENV) == "uvloop":
        import uvloop  # noqa: PLC0415 - the event loop `llm-gateway serve` runs on by default

        uvloop.install()
    if mode.startswith("floor"):
        asyncio.run(_floor(mode, n))
    elif mode in ("adapter", "sdk", "raw"):
        asyncio.run(_adapter(mode, n, base_url))
    else:
        asyncio.run(_gateway(mode, n, base_url))


# --- driver side ----------------------------------------------------------------------------------


def count(mode: str, n: int, base_url: str, loop: str) -> int:
    """Instructions of one worker run on event loop `loop` (valgrind's "Collected" total)."""
    command = [
        shutil.which("valgrind") or "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--worker",
        mode,
        str(n),
        base_url,
    ]
    env = {**os.environ, LOOP_ENV: loop}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stderr
    match = re.search(r"Collected : (\d+)", out)
    if match is None:
        raise RuntimeError(f"no instruction count from valgrind for {mode}: {out[-500:]}")
    return int(match.group(1))


def per_call(mode: str, base_url: str, loop: str) -> float:
    n = SCENARIOS[mode][0]
    return (count(mode, n, base_url, loop) - count(mode, 0, base_url, loop)) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "N", "BASE_URL"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "INSTRUCTIONS.md")
    parser.add_argument("--only", help="comma-separated scenarios (default: all); prints, writes nothing")
    parser.add_argument(
        "--loops",
        default=",".join(LOOPS),
        help="comma-separated event loops of the measured process: uvloop (what `llm-gateway serve` runs"
        " on by default) and asyncio (the loop of the figures before 2026-12-01)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="valgrind runs at once")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return
    loops = [loop for loop in args.loops.split(",") if loop in LOOPS]
    sys.path.insert(0, str(ROOT / "bench"))
    from run import free_port  # noqa: PLC0415

    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "upstream.py"), "--port", str(port), "--chunks", "50"],
        stdout=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    started = dt.datetime.now(dt.UTC)
    chosen = [m for m in (args.only.split(",") if args.only else SCENARIOS) if m in SCENARIOS]
    runs = [(mode, loop) for loop in loops for mode in chosen]
    try:
        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            values = pool.map(lambda run: per_call(run[0], base_url, run[1]), runs)
            counts: dict[tuple[str, str], float] = dict(zip(runs, values, strict=True))
    finally:
        upstream.terminate()
    if args.only:
        for (mode, loop), value in counts.items():
            print(f"{mode} ({loop}): {value / 1e6:.3f} M instructions per call")
        return
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    valgrind = subprocess.run(["valgrind", "--version"], check=False, capture_output=True, text=True).stdout.strip()
    lines = [
        "# Instructions per call",
        "",
        f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}, commit: {commit}, {valgrind},"
        f" Python {sys.version.split()[0]}",
        "- client and server in one process against bench/upstream.py; (run with N calls − run with none) / N",
        "- the ledger writes one batch at stop (as under load, where batches fill up), not once a second of"
        " valgrind's ~50× slower clock",
        "- event loops: uvloop is what `llm-gateway serve` runs on by default (`event_loop`); asyncio is the"
        " loop of the figures recorded before 2026-12-01",
        "",
        "| scenario | " + " | ".join(f"instructions per call, {loop}" for loop in loops) + " | vs unary chat |",
        "|---|" + "---|" * len(loops) + "---|",
    ]
    for mode in chosen:
        cells = " | ".join(f"{counts[(mode, loop)] / 1e6:.2f} M" for loop in loops)
        ratio = counts[(mode, loops[0])] / counts[("unary", loops[0])]
        lines.append(f"| {SCENARIOS[mode][1]} | {cells} | {ratio:.2f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
