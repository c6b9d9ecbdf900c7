"""`make bench`: the gateway (full interceptor chain: auth, rate limit, cache miss, logging, metrics)
against the direct call to the same loopback upstream, in one run; writes bench/RESULTS.md.

Gateway CPU comes from the gateway processes' own accounting (/proc/<pid>/stat utime+stime),
peak RSS from /proc/<pid>/status VmHWM. The load generator runs in this process (uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_gateway_server.interceptors.auth import hash_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import DirectClient, FloorClient, GatewayClient, Result, drive

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".run"
API_KEY = "bench-key-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (s), from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def peak_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024.0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    port: int
    workers: int

    @property
    def pids(self) -> list[int]:
        return children(self.process.pid) if self.workers > 1 else [self.process.pid]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


async def wait_serving(target: str, timeout_s: float = 30) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout_s)
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())


def start_gateway(name: str, settings: dict[str, Any], env: dict[str, str], workers: int = 1) -> Gateway:
    port = free_port()
    config = WORK / f"{name}.yaml"
    config.write_text(yaml.safe_dump(settings))
    log = open(WORK / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    command = [sys.executable, "-m", "llm_gateway_server", "serve", "--port", str(port), "--config", str(config)]
    if workers > 1:
        command += ["--workers", str(workers)]
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    return Gateway(process, port, workers)


class Tally:
    """Results and gateway CPU seconds of several load runs of one scenario, pooled."""

    def __init__(self) -> None:
        self.result = Result()
        self.cpu_s = 0.0

    def add(self, result: Result, cpu_s: float = 0.0) -> None:
        self.result.latencies += result.latencies
        self.result.ttfts += result.ttfts
        self.result.errors += result.errors
        self.result.elapsed_s += result.elapsed_s
        self.cpu_s += cpu_s

    def row(
        self, label: str, conc: int, direct: Result | None, pids: list[int], stream_chunks: int = 0
    ) -> dict[str, Any]:
        return row(label, conc, self.result, direct, self.cpu_s, peak_rss_mb(pids), stream_chunks)


def row(
    label: str,
    conc: int,
    gw: Result,
    direct: Result | None,
    cpu_s: float | None,
    rss_mb: float | None,
    stream_chunks: int = 0,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "scenario": label,
        "concurrency": conc,
        "calls": gw.calls,
        "errors": gw.errors,
        "p50_ms": gw.pct(0.5),
        "p90_ms": gw.pct(0.9),
        "p99_ms": gw.pct(0.99),
        "throughput": gw.throughput,
        "cpu_ms_per_call": (cpu_s / gw.calls * 1000.0) if cpu_s is not None and gw.calls else None,
        "peak_rss_mb": rss_mb,
    }
    if gw.ttfts:
        entry["ttft_p50_ms"] = gw.ttft_p50
    if stream_chunks and entry["cpu_ms_per_call"] is not None:
        entry["cpu_us_per_chunk"] = entry["cpu_ms_per_call"] * 1000.0 / stream_chunks
    if direct is not None:
        entry.update(
            direct_p50_ms=direct.pct(0.5),
            direct_p90_ms=direct.pct(0.9),
            direct_p99_ms=direct.pct(0.99),
            direct_throughput=direct.throughput,
        )
        if direct.ttfts:
            entry["direct_ttft_p50_ms"] = direct.ttft_p50
    return entry


async def measure(gateway: Gateway, call: Any, conc: int, count: int, max_s: float) -> tuple[Result, float]:
    before = cpu_seconds(gateway.pids)
    result = await drive(call, conc, count, max_s)
    return result, cpu_seconds(gateway.pids) - before


async def measure_machine(
    gateway: Gateway, upstream: subprocess.Popen[bytes], call: Any, conc: int, count: int, max_s: float
) -> tuple[Result, float, dict[str, float]]:
    """As `measure`, plus the CPU ms per call of the load generator (this process) and of the
    upstream: on a 2-core machine they share the cores with the gateway."""
    before = cpu_seconds(gateway.pids), time.process_time(), cpu_seconds([upstream.pid])
    result = await drive(call, conc, count, max_s)
    calls = max(result.calls, 1)
    shares = {
        "loadgen_cpu_ms_per_call": (time.process_time() - before[1]) / calls * 1000.0,
        "upstream_cpu_ms_per_call": (cpu_seconds([upstream.pid]) - before[2]) / calls * 1000.0,
    }
    return result, cpu_seconds(gateway.pids) - before[0], shares


COUNTS = {1: 400, 10: 2000, 50: 4000}
LITELLM_KEY = "sk-bench-master-0123456789abcdef"


def start_litellm(executable: Path, upstream_port: int) -> Gateway:
    """LiteLLM proxy (its own virtualenv, `make bench-litellm`) on the same upstream, default
    settings, one worker; `Gateway.port` is its HTTP port."""
    port = free_port()
    config = WORK / "litellm.yaml"
    model = {"model": "openai/bench", "api_base": f"http://127.0.0.1:{upstream_port}/v1", "api_key": "k"}
    config.write_text(yaml.safe_dump({"model_list": [{"model_name": "bench", "litellm_params": model}]}))
    log = open(WORK / "litellm.log", "wb")  # noqa: SIM115 - lives as long as the process
    env = {**os.environ, "LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    process = subprocess.Popen(
        [str(executable), "--config", str(config), "--port", str(port), "--host", "127.0.0.1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return Gateway(process, port, 1)


async def wait_http(client: DirectClient, timeout_s: float = 120) -> None:
    """Waits until an OpenAI-compatible server answers a chat call."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.chat()(0)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def bench_litellm(executable: Path, upstream_port: int, chunks: int, quick: bool) -> list[dict[str, Any]]:
    """LiteLLM proxy beside the gateway: unary chat at concurrency 1 and 10, streamed chat at 1."""
    proxy = start_litellm(executable, upstream_port)
    rows: list[dict[str, Any]] = []
    try:
        client = DirectClient(f"http://127.0.0.1:{proxy.port}/v1", api_key=LITELLM_KEY)
        await wait_http(client)
        await drive(client.chat(), 4, 100, 30)
        pids = lambda: [proxy.process.pid, *children(proxy.process.pid)]  # noqa: E731
        for conc in (1, 10):
            count = COUNTS[conc] // (8 if quick else 2)
            before = cpu_seconds(pids())
            result = await drive(client.chat(), conc, count, 60)
            rows.append(row("LiteLLM proxy: unary chat", conc, result, None, cpu_seconds(pids()) - before, None))
        before = cpu_seconds(pids())
        result = await drive(client.stream(), 1, COUNTS[1] // (16 if quick else 4), 60)
        rows.append(
            row(
                f"LiteLLM proxy: streamed chat ({chunks} chunks)",
                1,
                result,
                None,
                cpu_seconds(pids()) - before,
                None,
                chunks,
            )
        )
        for r in rows:
            r["peak_rss_mb"] = peak_rss_mb(pids())
        await client.close()
    finally:
        proxy.process.terminate()
        try:
            proxy.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proxy.process.kill()
    return rows


async def bench(quick: bool, litellm: Path | None = None) -> dict[str, Any]:
    WORK.mkdir(parents=True, exist_ok=True)
    chunks = 50
    up_fast, up_slow = free_port(), free_port()
    upstreams = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "upstream.py"), "--port", str(up_fast), "--chunks", str(chunks)],
            stdout=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "upstream.py"),
                "--port",
                str(up_slow),
                "--chunks",
                str(chunks),
                "--chunk-delay-ms",
                "40",
            ],
            stdout=subprocess.DEVNULL,
        ),
    ]
    floor_port = free_port()
    upstreams.append(
        subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "grpc_floor.py"), "--port", str(floor_port)],
            stdout=subprocess.DEVNULL,
        )
    )
    floor = Gateway(upstreams[-1], floor_port, 1)
    redis_port = free_port()
    redis_server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    base: dict[str, Any] = {
        "auth": {"keys": [{"id": "bench", "key_sha256": hash_key(API_KEY)}]},
        "rate_limits": {"default_rpm": 100_000_000, "default_tpm": 1_000_000_000},
        "cache": {"enabled": True},
        "providers": [{"name": "slow", "kind": "openai", "base_url": f"http://127.0.0.1:{up_slow}/v1"}],
        "retry": {"max_attempts": 1},
    }
    env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{up_fast}/v1", "OPENAI_API_KEY": "bench-upstream-key"}
    g1 = start_gateway("memory", {**base, "metrics_port": free_port()}, env)
    g2 = start_gateway(
        "redis", {**base, "metrics_port": free_port(), "redis_url": f"redis://127.0.0.1:{redis_port}/0"}, env
    )
    # Two workers with limits need shared state (`llm-gateway serve` refuses them without Redis): the
    # workers' figures compare g3 with g2, one worker of the same configuration.
    g3 = start_gateway(
        "workers2",
        {**base, "metrics_port": free_port(), "redis_url": f"redis://127.0.0.1:{redis_port}/0"},
        env,
        workers=2,
    )
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    try:
        await asyncio.sleep(1.0)
        for gateway in (g1, g2, g3):
            await wait_serving(gateway.target)
        clients = {g.target: GatewayClient(g.target, API_KEY) for g in (g1, g2, g3)}
        direct = DirectClient(f"http://127.0.0.1:{up_fast}/v1")
        floor_client = FloorClient(floor.target)
        await drive(floor_client.unary(), 4, 200, 10)
        c1, c2, c3 = clients[g1.target], clients[g2.target], clients[g3.target]
        # warm-up: connections, imports, tokenizer-free paths
        await drive(c1.chat("bench"), 4, 200, 10)
        await drive(c1.stream("bench"), 4, 50, 10)
        await drive(c2.chat("bench"), 4, 100, 10)
        await drive(c3.chat("bench"), 8, 200, 10)
        await drive(direct.chat(), 4, 100, 10)
        await drive(c1.chat("bench", unique=False), 1, 5, 5)  # fills the cache entry for the hit scenario
        concurrencies = [1, 10] if quick else [1, 10, 50]
        for conc in concurrencies:
            count = COUNTS[conc] // (4 if quick else 1)
            max_s = 20.0
            # At concurrency 1 the scenarios run in rounds, each gateway run beside its direct
            # run, so drift of this shared machine during the bench touches both sides alike.
            rounds = (2 if quick else 5) if conc == 1 else 1
            per = count // rounds
            t: defaultdict[str, Tally] = defaultdict(Tally)
            client_cpu = 0.0
            for _ in range(rounds):
                if conc == 1:
                    t["floor unary"].add(*await measure(floor, floor_client.unary(), conc, per, max_s))
                    t["floor stream"].add(*await measure(floor, floor_client.stream(), conc, per // 4, max_s))
                started_cpu = time.process_time()
                t["direct chat"].add(await drive(direct.chat(), conc, per, max_s))
                client_cpu += time.process_time() - started_cpu
                t["chat"].add(*await measure(g1, c1.chat("bench"), conc, per, max_s))
                t["direct stream"].add(await drive(direct.stream(), conc, per // 4, max_s))
                t["stream"].add(*await measure(g1, c1.stream("bench"), conc, per // 4, max_s))
                t["direct embed"].add(await drive(direct.embed(), conc, per, max_s))
                t["embed"].add(*await measure(g1, c1.embed("openai/bench"), conc, per, max_s))
                t["hit"].add(*await measure(g1, c1.chat("bench", unique=False), conc, per, max_s))
                t["redis"].add(*await measure(g2, c2.chat("bench"), conc, per, max_s))
            if conc == 1:
                rows.append(t["floor unary"].row("gRPC floor: bare grpc.aio unary", conc, None, floor.pids))
                rows.append(
                    t["floor stream"].row("gRPC floor: bare grpc.aio stream (50 msgs)", conc, None, floor.pids, 50)
                )
            d_chat = t["direct chat"].result
            rows.append(t["chat"].row("unary chat", conc, d_chat, g1.pids))
            rows[-1]["direct_client_cpu_ms_per_call"] = client_cpu / max(d_chat.calls, 1) * 1000.0
            rows.append(
                t["stream"].row(f"streamed chat ({chunks} chunks)", conc, t["direct stream"].result, g1.pids, chunks)
            )
            rows.append(t["embed"].row("embeddings", conc, t["direct embed"].result, g1.pids))
            rows.append(t["hit"].row("cache hit (memory)", conc, d_chat, g1.pids))
            rows.append(t["redis"].row("unary chat, rate limit + cache on Redis", conc, d_chat, g2.pids))
            if conc == 50:
                gw, cpu, shares = await measure_machine(g2, upstreams[0], c2.chat("bench"), conc, count, max_s)
                extra["one_worker"] = {"throughput": gw.throughput, "cpu_ms_per_call": cpu / max(gw.calls, 1) * 1e3}
                extra["one_worker"].update(shares)
                gw, cpu, shares = await measure_machine(g3, upstreams[0], c3.chat("bench"), conc, count, max_s)
                rows.append(row("unary chat, --workers 2", conc, gw, d_chat, cpu, peak_rss_mb(g3.pids)))
                rows[-1].update(shares)
        if litellm is not None:
            rows += await bench_litellm(litellm, up_fast, chunks, quick)
        # 1000 concurrent open streams (upstream sends 50 chunks 40 ms apart: ~2 s each)
        streams = 250 if quick else 1000
        rss_before = peak_rss_mb(g1.pids)
        opened = await drive(c1.stream("slow/bench"), streams, streams, 120)
        extra["open_streams"] = {
            "streams": streams,
            "completed": opened.calls,
            "errors": opened.errors,
            "peak_rss_mb": peak_rss_mb(g1.pids),
            "peak_rss_before_mb": rss_before,
            "p50_ms": opened.pct(0.5),
            "p99_ms": opened.pct(0.99),
        }
        for client in clients.values():
            await client.close()
        await direct.close()
        await floor_client.close()
    finally:
        for process in (g1.process, g2.process, g3.process, *upstreams, redis_server):
            process.terminate()
        for process in (g1.process, g2.process, g3.process, *upstreams, redis_server):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    return {"rows": rows, **extra}


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_gb = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    python = platform.python_version()
    return f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GiB, Linux {platform.release()}, Python {python}"


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def run_facts() -> dict[str, str]:
    """When, on which commit and on what machine a run happened (stored with its results)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], check=False, capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "machine": machine(),
    }


def write_results(data: dict[str, Any], path: Path) -> None:
    facts = data.get("facts") or run_facts()
    lines = [
        "# Benchmark results",
        "",
        f"- date: {facts['date']}",
        f"- commit: {facts['commit']}",
        f"- machine: {facts['machine']} (shared and noisy: compare ratios within this run)",
        "- gateway: full interceptor chain on (auth, rate limit, cache enabled with misses, JSON logging, metrics);"
        " loopback upstream bench/upstream.py; load generator in one process (uvloop)",
        "- direct: the same call with the official openai SDK (aiohttp transport, as the gateway) straight to the"
        " upstream (the zero-overhead limit)",
        "- concurrency 1: five rounds, each gateway run next to its direct and floor runs; each row pools its rounds",
        "- gRPC floor: bench/grpc_floor.py, a bare grpc.aio server (uvloop, no interceptors, no protobuf, no"
        " upstream): what any Python gRPC service pays per call and per message here",
        "",
        "| scenario | conc | calls | err | p50 ms | p90 ms | p99 ms | direct p50 / p99 ms | added p50 / p99 ms"
        " | calls/s (direct) | gateway CPU ms/call | TTFT p50 ms (direct) | CPU µs/chunk | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        added = (
            f"{fmt(r['p50_ms'] - r['direct_p50_ms'])} / {fmt(r['p99_ms'] - r['direct_p99_ms'])}"
            if "direct_p50_ms" in r
            else "–"
        )
        lines.append(
            f"| {r['scenario']} | {r['concurrency']} | {r['calls']} | {r['errors']}"
            f" | {fmt(r['p50_ms'])} | {fmt(r['p90_ms'])}"
            f" | {fmt(r['p99_ms'])} | {fmt(r.get('direct_p50_ms'))} / {fmt(r.get('direct_p99_ms'))} | {added}"
            f" | {fmt(r['throughput'], 0)} ({fmt(r.get('direct_throughput'), 0)}) | {fmt(r['cpu_ms_per_call'], 3)}"
            f" | {fmt(r.get('ttft_p50_ms'))} ({fmt(r.get('direct_ttft_p50_ms'))}) | {fmt(r.get('cpu_us_per_chunk'), 1)}"
            f" | {fmt(r['peak_rss_mb'], 0)} |"
        )
    streams = data.get("open_streams")
    if streams:
        lines += [
            "",
            f"Open streams: {streams['streams']} concurrent ChatStream calls (50 chunks, 40 ms apart):"
            f" {streams['completed']} completed, {streams['errors']} errors, p50 {fmt(streams['p50_ms'])} ms,"
            f" p99 {fmt(streams['p99_ms'])} ms, gateway peak RSS {fmt(streams['peak_rss_mb'], 0)} MB"
            f" (before: {fmt(streams['peak_rss_before_mb'], 0)} MB).",
        ]
    one = data.get("one_worker")
    two = next((r for r in data["rows"] if r["scenario"] == "unary chat, --workers 2"), None)
    if one and two:
        lines += ["", *worker_lines(one, two)]
    unary = _find(data, "unary chat", 1)
    if unary and "direct_client_cpu_ms_per_call" in unary:
        lines += [
            "",
            "Direct SDK client (load generator process, concurrency 1):"
            f" {fmt(unary['direct_client_cpu_ms_per_call'], 3)} ms of CPU per non-streamed call:"
            " the official SDK's own cost, which the gateway pays too.",
        ]
    lines += litellm_lines(data)
    lines += ["", *budget_lines(data)]
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    path.write_text("\n".join(lines) + "\n")
    (path.parent / "results.json").write_text(json.dumps(data, indent=2))


def worker_ceiling(one: dict[str, Any], two: dict[str, Any]) -> tuple[float, float]:
    """The most calls/s one and two workers can serve on this machine, from the CPU per call of the
    gateway, the load generator and the upstream measured in this run (they share the same cores):
    a worker is bounded by its own core, all of them together by the machine's cores."""
    cores = os.cpu_count() or 1
    others = two["loadgen_cpu_ms_per_call"] + two["upstream_cpu_ms_per_call"]
    one_cap = min(1000.0 / one["cpu_ms_per_call"], cores * 1000.0 / (one["cpu_ms_per_call"] + others))
    two_cap = min(2000.0 / two["cpu_ms_per_call"], cores * 1000.0 / (two["cpu_ms_per_call"] + others))
    return one_cap, two_cap


def worker_lines(one: dict[str, Any], two: dict[str, Any]) -> list[str]:
    """The `--workers 2` result and the most this machine's cores allow (`worker_ceiling`)."""
    one_cap, two_cap = worker_ceiling(one, two)
    return [
        f"Workers: `--workers 2` (limits and cache on Redis, which several workers need) served"
        f" {fmt(two['throughput'], 0)} calls/s at concurrency 50 against"
        f" {fmt(one['throughput'], 0)} for one worker of the same configuration:"
        f" {fmt(two['throughput'] / one['throughput'])}×"
        f" (8 client connections; SO_REUSEPORT balances connections). CPU per call: gateway"
        f" {fmt(one['cpu_ms_per_call'], 3)} ms (1 worker) / {fmt(two['cpu_ms_per_call'], 3)} ms (2 workers),"
        f" load generator {fmt(two['loadgen_cpu_ms_per_call'], 3)} ms,"
        f" upstream {fmt(two['upstream_cpu_ms_per_call'], 3)} ms."
        f" With all of them on {os.cpu_count() or 1} cores, the ceiling is {fmt(one_cap, 0)} calls/s for one"
        f" worker and {fmt(two_cap, 0)} for two: two workers reached"
        f" {fmt(100.0 * two['throughput'] / two_cap, 0)}% of their ceiling.",
    ]


def litellm_lines(data: dict[str, Any]) -> list[str]:
    """Gateway CPU against LiteLLM proxy's, measured in this run on the same upstream."""
    lines: list[str] = []
    for conc in (1, 10):
        ours, theirs = _find(data, "unary chat", conc), _find(data, "LiteLLM proxy: unary chat", conc)
        if ours and theirs and ours["cpu_ms_per_call"] and theirs["cpu_ms_per_call"]:
            lines.append(
                f"- unary chat, concurrency {conc}: gateway {fmt(ours['cpu_ms_per_call'], 3)} ms of CPU per call,"
                f" LiteLLM proxy {fmt(theirs['cpu_ms_per_call'], 3)} ms"
                f" ({fmt(theirs['cpu_ms_per_call'] / ours['cpu_ms_per_call'], 1)}× the gateway's);"
                f" p50 {fmt(ours['p50_ms'])} ms against {fmt(theirs['p50_ms'])} ms"
            )
    ours = _find(data, "streamed chat (50 chunks)", 1)
    theirs = _find(data, "LiteLLM proxy: streamed chat (50 chunks)", 1)
    if ours and theirs and ours.get("cpu_us_per_chunk") and theirs.get("cpu_us_per_chunk"):
        lines.append(
            f"- streamed chat, concurrency 1: gateway {fmt(ours['cpu_us_per_chunk'], 1)} µs of CPU per chunk,"
            f" LiteLLM proxy {fmt(theirs['cpu_us_per_chunk'], 1)} µs"
            f" ({fmt(theirs['cpu_us_per_chunk'] / ours['cpu_us_per_chunk'], 1)}×)"
        )
    return (
        ["", "LiteLLM proxy side by side (same upstream, same run, default settings, one worker):", *lines]
        if lines
        else []
    )


def _find(data: dict[str, Any], scenario: str, conc: int) -> dict[str, Any] | None:
    return next((r for r in data["rows"] if r["scenario"] == scenario and r["concurrency"] == conc), None)


def budget_lines(data: dict[str, Any]) -> list[str]:
    """The budget, each figure beside what this run measured. Relative budgets compare figures of
    this run (issue 16's decisions): gateway CPU per unary call against the direct SDK client's own
    CPU per call; against LiteLLM proxy's CPU (≥ 10× less per unary call, ≥ 20× less per streamed
    chunk); the cache hit's p50 against the bare gRPC floor's p50 + 0.3 ms; two workers against
    90% of the ceiling the measured CPU shares allow (`worker_ceiling`)."""
    unary, stream = _find(data, "unary chat", 1), _find(data, "streamed chat (50 chunks)", 1)
    hit, one = _find(data, "cache hit (memory)", 1), data.get("one_worker")
    floor = _find(data, "gRPC floor: bare grpc.aio unary", 1)
    two = _find(data, "unary chat, --workers 2", 50)
    lite_unary = _find(data, "LiteLLM proxy: unary chat", 1)
    lite_stream = _find(data, "LiteLLM proxy: streamed chat (50 chunks)", 1)
    streams = data.get("open_streams") or {}
    checks: list[tuple[str, str, float | None, float, bool]] = []  # what, unit, measured, budget, lower is better
    if unary:
        checks += [
            ("added latency p50 (c=1)", "ms", unary["p50_ms"] - unary["direct_p50_ms"], 1.0, True),
            ("added latency p99 (c=1)", "ms", unary["p99_ms"] - unary["direct_p99_ms"], 3.0, True),
        ]
        if unary.get("direct_client_cpu_ms_per_call"):
            ratio = unary["cpu_ms_per_call"] / unary["direct_client_cpu_ms_per_call"]
            checks.append(("gateway CPU per unary chat / direct SDK client's (c=1)", "×", ratio, 1.0, True))
        if lite_unary and unary["cpu_ms_per_call"]:
            ratio = lite_unary["cpu_ms_per_call"] / unary["cpu_ms_per_call"]
            checks.append(("LiteLLM proxy's CPU per unary chat / the gateway's (c=1)", "×", ratio, 10.0, False))
    if stream:
        checks += [
            ("gateway CPU per streamed chunk (c=1)", "µs", stream.get("cpu_us_per_chunk"), 100.0, True),
            ("TTFT overhead p50 (c=1)", "ms", stream["ttft_p50_ms"] - stream["direct_ttft_p50_ms"], 1.0, True),
        ]
        if lite_stream and stream.get("cpu_us_per_chunk") and lite_stream.get("cpu_us_per_chunk"):
            ratio = lite_stream["cpu_us_per_chunk"] / stream["cpu_us_per_chunk"]
            checks.append(("LiteLLM proxy's CPU per streamed chunk / the gateway's (c=1)", "×", ratio, 20.0, False))
    if hit and floor:
        checks.append(("cache hit p50 − gRPC floor p50 (c=1)", "ms", hit["p50_ms"] - floor["p50_ms"], 0.3, True))
    if streams:
        checks.append((f"RSS with {streams['streams']} open streams", "MB", streams["peak_rss_mb"], 300.0, True))
    if one and two:
        share = two["throughput"] / worker_ceiling(one, two)[1]
        checks.append(("--workers 2 throughput / its ceiling on this machine (c=50)", "×", share, 0.9, False))
    lines = ["## Budget (this run)", "", "| figure | budget | measured | verdict |", "|---|---|---|---|"]
    for what, unit, measured, budget, lower in checks:
        if measured is None:
            continue
        ok = measured <= budget if lower else measured >= budget
        verdict = "met" if ok else f"missed by {abs(measured - budget):.2f} {unit}"
        sign = "≤" if lower else "≥"
        lines.append(f"| {what} | {sign} {budget:g} {unit} | {measured:.2f} {unit} | {verdict} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer calls, concurrency 1 and 10 only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite --out from bench/results.json (e.g. after editing NOTES.md)"
    )
    parser.add_argument(
        "--litellm", type=Path, default=None, help="the `litellm` executable of a LiteLLM proxy install (optional)"
    )
    args = parser.parse_args()
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up for the load generator

        uvloop.install()
    except ImportError:
        pass
    if args.render:
        data = json.loads((ROOT / "bench" / "results.json").read_text())
        write_results(data, args.out)
        return
    started = time.monotonic()
    facts = run_facts()
    data = asyncio.run(bench(args.quick, args.litellm))
    data["facts"] = facts
    write_results(data, args.out)
    print(args.out.read_text())
    print(f"bench took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
