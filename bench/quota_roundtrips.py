"""`python bench/quota_roundtrips.py --before <tree> [--after <tree>]`: gateway CPU per call with
rate limits and budgets, on Redis beside the in-memory backend, for two source trees.

For each tree and backend a gateway process (`app.start_server` of that tree under uvloop,
`gc.freeze()`, metrics off, cache off) serves one API key with rpm, tpm and concurrent-stream
limits and a daily budget (configured in YAML), calling a priced model on `bench/upstream.py`; one
`redis-server` on a free port serves every Redis gateway. With `--team`, the key is created
through the admin API in a team that has limits and a budget of its own (two scopes per call;
trees with the admin API only). A tree before the quota change enforces the key's rate limits
only (its limiter has no budgets): acquire + reconcile per call, plus open/close of the stream
slot per stream (four Redis round trips).

Calls are sequential (concurrency 1) over one channel; each gateway's CPU comes from its own
accounting (/proc/<pid>/stat utime + stime), so the client's and Redis's CPU are not in it
(Redis's is reported beside). Rounds alternate between the gateways; the table has the median
per round. Unary Chat and ChatStream (5 chunks) are measured apart. Absolute figures of two trees
also differ by what else changed between them (auth through the key cache, the usage ledger);
the Redis − memory difference within a tree is the figure this compares.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "bench-quota-key-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MODEL = "bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_s(pid: int) -> float:
    """CPU time of a process, seconds: the sum over its threads of /proc/…/schedstat (time on a
    CPU, ns: finer than utime + stime's clock ticks; every thread of a gateway lives as long as it
    does), or utime + stime where schedstat is missing."""
    try:
        return sum(int((t / "schedstat").read_text().split()[0]) for t in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK


LIMITS = {"rpm": 100_000_000, "tpm": 1_000_000_000, "max_concurrent_streams": 1000}
ADMIN_KEY = "bench-admin-credential-0123456789"


def _config(redis_url: str | None, database: Path) -> dict[str, Any]:
    import hashlib  # noqa: PLC0415

    limits = LIMITS
    return {
        "database_url": f"sqlite:///{database}",
        "admin_key": ADMIN_KEY,
        "port": 0,
        "metrics_port": 0,
        "log_level": "warning",
        "retry": {"max_attempts": 1},
        "redis_url": redis_url,
        "cache": {"enabled": False},
        "models": [
            {
                "id": MODEL,
                "provider": "openai",
                "pricing": {"input_per_million_usd": 0.15, "output_per_million_usd": 0.6},
            }
        ],
        "auth": {
            "keys": [
                {
                    "id": "bench",
                    "key_sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                    **limits,
                    "budget": {"limit_usd": 1_000_000.0, "period": "daily"},
                }
            ]
        },
    }


# --- the gateway process ----------------------------------------------------------------------


def _mode(application: Any) -> str:
    """Which quota layer the tree's chain has."""
    layers = [type(layer).__name__ for layer in application.interceptors[0].layers]
    if "QuotaInterceptor" in layers:
        return "QuotaInterceptor (limits + budgets, 1 script before, 1 after)"
    return "RateLimitInterceptor (limits only)"


async def _serve(config: dict[str, Any], upstream: str, ready: Path) -> None:
    from llm_gateway_server.app import start_server  # noqa: PLC0415
    from llm_gateway_server.config import load_settings  # noqa: PLC0415

    environ = {"OPENAI_BASE_URL": upstream, "OPENAI_API_KEY": "k"}
    settings = load_settings(environ=environ, overrides=config)
    running = await start_server(settings, environ)
    gc.freeze()
    ready.write_text(f"{running.port} {_mode(running.application)}")  # noqa: ASYNC240 - once, at start
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await running.stop()


# --- the driver -------------------------------------------------------------------------------


@dataclass
class Gateway:
    tree: str
    backend: str
    process: subprocess.Popen[str]
    port: int
    mode: str
    secret: str = API_KEY
    callgrind: Path | None = None
    idle_per_s: list[float] = field(default_factory=list)
    unary_ms: list[float] = field(default_factory=list)
    stream_ms: list[float] = field(default_factory=list)
    redis_unary_ms: list[float] = field(default_factory=list)
    redis_stream_ms: list[float] = field(default_factory=list)


def _start(tree: Path, label: str, backend: str, redis_url: str, upstream: str, work: Path, callgrind: bool) -> Gateway:
    config = work / f"{label}-{backend}.yaml"
    database = work / f"{label}-{backend}.db"
    settings = _config(redis_url if backend == "redis" else None, database)
    if callgrind:  # everything runs ~50 times slower: no Redis timeout may fire
        settings["redis_timeout_s"] = 10.0
    config.write_text(yaml.safe_dump(settings))
    env = {
        **os.environ,
        "PYTHONPATH": f"{tree / 'server'}:{tree / 'clients/python/src'}",
        "PYTHONHASHSEED": "0",
    }
    ready, log = work / f"{label}-{backend}.ready", work / f"{label}-{backend}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "serve", "--config", str(config), "--upstream", upstream]
    if callgrind:
        out = work / f"{label}-{backend}.callgrind"
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *command]
    with log.open("w") as out:
        process = subprocess.Popen(
            [*command, "--ready", str(ready)], env=env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=work
        )
    deadline = time.monotonic() + (900 if callgrind else 60)
    while not ready.exists() or not ready.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"{label}/{backend}: the gateway did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    port, mode = ready.read_text().split(" ", 1)
    return Gateway(
        label, backend, process, int(port), mode, callgrind=work / f"{label}-{backend}.callgrind" if callgrind else None
    )


def _callgrind(gateway: Gateway, *command: str) -> None:
    subprocess.run(["callgrind_control", *command, str(gateway.process.pid)], check=True, capture_output=True)


IDLE_S = 10.0  # how long the idle rate of a gateway under callgrind is counted


async def _meter_start(gateway: Gateway, redis_pid: int) -> tuple[float, float]:
    """Starts counting: (gateway CPU s, Redis CPU s), or under callgrind (wall time, 0) with the
    instrumentation on."""
    if gateway.callgrind is None:
        return _cpu_s(gateway.process.pid), _cpu_s(redis_pid)
    await asyncio.to_thread(_callgrind, gateway, "--zero")
    await asyncio.to_thread(_callgrind, gateway, "--instr=on")
    return time.monotonic(), 0.0


async def _instructions(gateway: Gateway) -> int:
    """Turns the instrumentation off and returns the instructions counted since it was on."""
    assert gateway.callgrind is not None
    await asyncio.to_thread(_callgrind, gateway, "--instr=off")
    before = set(gateway.callgrind.parent.glob(gateway.callgrind.name + ".*"))
    await asyncio.to_thread(_callgrind, gateway, "--dump")
    deadline = time.monotonic() + 60
    while not (dumps := set(gateway.callgrind.parent.glob(gateway.callgrind.name + ".*")) - before):
        if time.monotonic() > deadline:
            raise SystemExit("callgrind wrote no dump")
        await asyncio.sleep(0.2)
    (dump,) = dumps
    await asyncio.sleep(0.5)  # written whole
    totals = next(line for line in dump.read_text().splitlines() if line.startswith("totals:"))
    return int(totals.split()[1])


async def _meter_stop(
    gateway: Gateway, redis_pid: int, started: tuple[float, float], calls: int
) -> tuple[float, float]:
    """Per call since `_meter_start`: (gateway CPU ms, Redis CPU ms), or under callgrind
    (gateway instructions, 0) less what the gateway executes idle in the same wall time (timers,
    the key-events listener, gRPC's poller: under callgrind a call lasts ~50 times longer, so
    idle work would otherwise weigh in by how long a call takes, not by what it does)."""
    if gateway.callgrind is None:
        own = (_cpu_s(gateway.process.pid) - started[0]) / calls * 1000
        return own, (_cpu_s(redis_pid) - started[1]) / calls * 1000
    wall = time.monotonic() - started[0]
    counted = await _instructions(gateway)
    await _meter_start(gateway, redis_pid)
    idle_started = time.monotonic()
    await asyncio.sleep(IDLE_S)
    idle = await _instructions(gateway) / (time.monotonic() - idle_started)
    gateway.idle_per_s.append(idle)
    return (counted - idle * wall) / calls, 0.0


async def _team_key(gateway: Gateway) -> None:
    """Creates a team (limits, budget) and a key in it (limits, budget) through the admin API and
    makes the gateway's calls use that key."""
    import grpc  # noqa: PLC0415

    from llm_gateway.admin.v1 import admin_pb2 as apb  # noqa: PLC0415
    from llm_gateway.admin.v1 import admin_pb2_grpc as apb_grpc  # noqa: PLC0415

    admin = (("authorization", f"Bearer {ADMIN_KEY}"),)
    limits = apb.Limits(**LIMITS)
    budget = apb.Budget(limit_usd=1_000_000.0, period=apb.BUDGET_PERIOD_DAILY)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = apb_grpc.AdminServiceStub(channel)
        team = apb.Team(display_name="bench team", limits=limits, budget=budget)
        await stub.CreateTeam(apb.CreateTeamRequest(team=team, team_id="bench-team"), metadata=admin)
        key = apb.Key(display_name="bench team key", team="teams/bench-team", limits=limits, budget=budget)
        created = await stub.CreateKey(apb.CreateKeyRequest(key=key, key_id="bench-team-key"), metadata=admin)
    gateway.secret = created.secret
    gateway.mode += ", key + team"


async def _measure(gateway: Gateway, redis_pid: int, calls: int, streams: int) -> None:
    import grpc  # noqa: PLC0415

    from llm_gateway.v1 import llm_gateway_pb2 as pb  # noqa: PLC0415
    from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc  # noqa: PLC0415

    metadata = (("authorization", f"Bearer {gateway.secret}"),)
    generation = pb.GenerationOptions(max_output_tokens=64)

    def request(kind: type[Any], i: int) -> Any:
        text = pb.ContentPart(text=f"quota bench {time.time_ns()} {i}")
        return kind(model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content=[text])], generation=generation)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb_grpc.LLMGatewayServiceStub(channel)
        for i in range(0 if gateway.unary_ms else 20):  # warm-up: connections, scripts loaded
            await stub.Chat(request(pb.ChatRequest, i), metadata=metadata)
            _ = [e async for e in stub.ChatStream(request(pb.ChatStreamRequest, i), metadata=metadata)]
        await asyncio.sleep(0.2)
        started = await _meter_start(gateway, redis_pid)
        for i in range(calls):
            await stub.Chat(request(pb.ChatRequest, i), metadata=metadata)
        await asyncio.sleep(0.2)  # let the last settle land
        own, redis = await _meter_stop(gateway, redis_pid, started, calls)
        gateway.unary_ms.append(own)
        gateway.redis_unary_ms.append(redis)
        started = await _meter_start(gateway, redis_pid)
        for i in range(streams):
            events = [e async for e in stub.ChatStream(request(pb.ChatStreamRequest, i), metadata=metadata)]
            assert events[-1].WhichOneof("event") == "final"
        await asyncio.sleep(0.2)
        own, redis = await _meter_stop(gateway, redis_pid, started, streams)
        gateway.stream_ms.append(own)
        gateway.redis_stream_ms.append(redis)


def _commit(tree: Path) -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return f"{head}{' + working tree' if dirty else ''}"


async def _drive(args: argparse.Namespace, trees: list[tuple[str, Path]]) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    redis_port, upstream_port = _free_port(), _free_port()
    redis = subprocess.Popen(
        [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    upstream = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "upstream.py"), "--port", str(upstream_port), "--chunks", "5"],
        stdout=subprocess.DEVNULL,
    )
    await asyncio.sleep(0.5)
    gateways: list[Gateway] = []
    with tempfile.TemporaryDirectory() if args.work is None else contextlib.nullcontext(args.work) as work:
        try:
            for label, tree in trees:
                for backend in ("memory", "redis"):
                    gateways.append(
                        _start(
                            tree,
                            label,
                            backend,
                            f"redis://127.0.0.1:{redis_port}/0",
                            f"http://127.0.0.1:{upstream_port}/v1",
                            Path(work),
                            args.instructions,
                        )
                    )
                    if args.team and "QuotaInterceptor" in gateways[-1].mode:
                        await _team_key(gateways[-1])
            for _ in range(args.rounds):
                for gateway in gateways:
                    await _measure(gateway, redis.pid, args.calls, args.streams)
        finally:
            for gateway in gateways:
                gateway.process.send_signal(signal.SIGTERM)
            for gateway in gateways:
                gateway.process.wait(timeout=20)
            upstream.terminate()
            redis.terminate()
    _report(args, trees, gateways)


def _report(args: argparse.Namespace, trees: list[tuple[str, Path]], gateways: list[Gateway]) -> None:
    median = statistics.median
    unit = "M instructions" if args.instructions else "CPU ms"
    scale = 1e-6 if args.instructions else 1.0
    print(f"machine: {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for label, tree in trees:
        print(f"{label}: {tree} at {_commit(tree)}")
    how = "instructions under callgrind" if args.instructions else "CPU from /proc"
    print(
        f"{args.rounds} rounds of {args.calls} unary calls and {args.streams} streams per gateway, concurrency 1, {how}"
    )
    print()
    redis_column = "" if args.instructions else " Redis CPU ms/call (unary / stream) |"
    print(f"| tree | backend | chain | unary {unit}/call | stream {unit}/call |{redis_column}")
    print("|---|---|---|---|---|" + ("" if args.instructions else "---|"))
    for g in gateways:
        cells = f"{median(g.unary_ms) * scale:.3f} | {median(g.stream_ms) * scale:.3f} |"
        if not args.instructions:
            cells += (
                f" {median(g.redis_unary_ms):.3f} / {median(g.redis_stream_ms):.3f} |"
                if g.backend == "redis"
                else " – |"
            )
        print(f"| {g.tree} | {g.backend} | {g.mode} | {cells}")
    if args.instructions:
        idle = ", ".join(f"{g.tree}/{g.backend} {median(g.idle_per_s) / 1e6:.2f}" for g in gateways)
        print(f"\nidle instructions per second (M), subtracted for each batch's wall time: {idle}")
    print()
    print(f"| tree | Redis − memory, unary ({unit}) | Redis − memory, stream ({unit}) | unary differences |")
    print("|---|---|---|---|")
    # the median of the rounds' differences: a round measures both gateways of a tree back to
    # back, so load that drifts over minutes cancels
    for label, _ in trees:
        memory, on_redis = (next(g for g in gateways if (g.tree, g.backend) == (label, b)) for b in ("memory", "redis"))
        pairs = zip(memory.unary_ms, on_redis.unary_ms, strict=True)
        differences = sorted((r - m) * scale for m, r in pairs)
        low, high = differences[len(differences) // 4], differences[3 * len(differences) // 4]
        rounds = f"{len(differences)} rounds, quartiles {low:+.3f} … {high:+.3f}"
        unary = median(r - m for m, r in zip(memory.unary_ms, on_redis.unary_ms, strict=True)) * scale
        stream = median(r - m for m, r in zip(memory.stream_ms, on_redis.stream_ms, strict=True)) * scale
        print(f"| {label} | {unary:+.3f} | {stream:+.3f} | {rounds} |")


def main() -> None:
    """Runs the comparison (see module docstring), or one gateway (`serve`, internal)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="internal: one gateway process")
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--upstream", required=True)
    serve.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--before", default=str(ROOT), help="the tree before the change")
    parser.add_argument("--after", default=str(ROOT), help="the tree after the change (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--work", type=Path, help="keep configs, logs and callgrind dumps in this directory")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count the gateways' instructions under callgrind (deterministic; slow: use small --calls)",
    )
    parser.add_argument(
        "--team", action="store_true", help="the key is in a team with limits and a budget (trees with the admin API)"
    )
    args = parser.parse_args()
    if args.command == "serve":
        import uvloop  # noqa: PLC0415

        uvloop.install()
        asyncio.run(_serve(yaml.safe_load(args.config.read_text()), args.upstream, args.ready))
        return
    asyncio.run(_drive(args, [("before", Path(args.before).resolve()), ("after", Path(args.after).resolve())]))


if __name__ == "__main__":
    main()
