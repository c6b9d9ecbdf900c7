"""`python bench/quota_roundtrips.py --before <tree> [--after <tree>]`: gateway CPU per call with
rate limits and budgets, on Redis beside the in-memory backend, for two source trees.

For each tree and backend a gateway process (uvloop, `gc.freeze()`, metrics off, cache off) serves
one API key with rpm, tpm and concurrent-stream limits and a daily budget, calling a priced model
on `bench/upstream.py`; one Redis server (`redis-server` on a free port) serves every Redis
gateway. A tree that has `interceptors/quota.py` but whose composition root does not yet build a
`QuotaInterceptor` gets its chain assembled here the way `app.py` will: auth → a layer that puts
the key's `Tenant` (key and, with `--team`, its team, each with limits and a budget) on the call
record → validation → `QuotaInterceptor` with the catalog's `CostEstimator`. Trees without
quotas (before the change) run their own chain: rate limits only, as they had.

Calls are sequential (concurrency 1) over one channel; each gateway's CPU comes from its own
accounting (/proc/<pid>/stat utime + stime), so the client's and Redis's CPU are not in it
(Redis's is reported beside). Rounds alternate between the gateways; the table has the median
per round. Unary Chat and ChatStream (5 chunks) are measured apart.
"""

from __future__ import annotations

import argparse
import asyncio
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
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _config(redis_url: str | None) -> dict[str, Any]:
    import hashlib  # noqa: PLC0415

    limits = {"rpm": 100_000_000, "tpm": 1_000_000_000, "max_concurrent_streams": 1000}
    return {
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


def _quota_chain(application: Any, settings: Any, team: bool) -> tuple[Any, str]:
    """The chain `app.py` builds once it wires quotas (see module docstring), and its name."""
    from llm_gateway_server.interceptors import quota  # noqa: PLC0415
    from llm_gateway_server.interceptors.base import GatewayInterceptor, InterceptorChain  # noqa: PLC0415
    from llm_gateway_server.routing.pricing import CostEstimator  # noqa: PLC0415
    from llm_gateway_server.routing.resolver import Resolver  # noqa: PLC0415
    from llm_gateway_server.tenancy.records import (  # noqa: PLC0415
        Budget,
        BudgetPeriod,
        KeyRecord,
        Limits,
        TeamRecord,
        Tenant,
        usd_to_nano,
    )
    from llm_gateway_server.transport.call_record import current_call  # noqa: PLC0415

    chain = application.interceptors[0]
    layers = list(chain.layers)
    if any(type(layer) is quota.QuotaInterceptor for layer in layers):
        return chain, "app.py's chain (QuotaInterceptor)"
    at = next(i for i, layer in enumerate(layers) if isinstance(layer, quota.QuotaInterceptor))
    key = settings.auth.keys[0]
    budget = Budget(usd_to_nano(key.budget.limit_usd), BudgetPeriod(key.budget.period))
    limits = Limits(key.rpm, key.tpm, key.max_concurrent_streams)
    group = TeamRecord("bench-team", "bench team", limits=limits, budget=budget) if team else None
    record = KeyRecord(key.id, key.id, key.key_sha256, team_id=group.id if group else "", limits=limits, budget=budget)
    tenants = {key.id: Tenant(record, group)}

    class Tenants(GatewayInterceptor):
        """Puts the authenticated key's Tenant on the call record (the key cache's part)."""

        def _note(self) -> None:
            call = current_call.get()
            if call is not None:
                call.tenant = tenants.get(call.key_id)

        async def unary(self, inner: Any, request: Any, context: Any, method: str) -> Any:
            self._note()
            return await inner(request, context)

        async def stream(self, inner: Any, request: Any, context: Any, method: str) -> Any:
            self._note()
            async for item in inner(request, context):
                yield item

    estimate = CostEstimator(Resolver(application.catalog, application.registry, settings.aliases))
    interceptor = quota.QuotaInterceptor(
        layers[at]._backend,
        settings.rate_limits,
        settings.budgets,
        estimate,
        application.metrics,
        settings.default_deadline_s + settings.grace_period_s,
    )
    auth = next(i for i, layer in enumerate(layers) if type(layer).__name__ == "AuthInterceptor")
    layers[at] = interceptor
    layers.insert(auth + 1, Tenants())
    scopes = "key + team" if team else "key"
    return InterceptorChain(layers), f"QuotaInterceptor assembled here ({scopes}: limits and budgets)"


async def _serve(config: Path, upstream: str, team: bool) -> None:
    from llm_gateway_server.app import build_application  # noqa: PLC0415
    from llm_gateway_server.config import load_settings  # noqa: PLC0415
    from llm_gateway_server.transport.server import start_grpc  # noqa: PLC0415

    environ = {"OPENAI_BASE_URL": upstream, "OPENAI_API_KEY": "k"}
    settings = load_settings(environ=environ, overrides=yaml.safe_load(config.read_text()))
    application = build_application(settings, environ)
    chain, mode = application.interceptors[0], "the tree's own chain (rate limits only)"
    try:
        from llm_gateway_server.interceptors import quota  # noqa: F401, PLC0415
    except ImportError:
        pass
    else:
        chain, mode = _quota_chain(application, settings, team)
    server = await start_grpc(
        application.servicer,
        [chain],
        host="127.0.0.1",
        port=0,
        max_message_bytes=settings.max_message_bytes,
        reuse_port=False,
        grace_period_s=0.5,
    )
    gc.freeze()
    print(f"PORT {server.port} MODE {mode}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop()
    await application.aclose()


# --- the driver -------------------------------------------------------------------------------


@dataclass
class Gateway:
    tree: str
    backend: str
    process: subprocess.Popen[str]
    port: int
    mode: str
    unary_ms: list[float] = field(default_factory=list)
    stream_ms: list[float] = field(default_factory=list)
    redis_unary_ms: list[float] = field(default_factory=list)
    redis_stream_ms: list[float] = field(default_factory=list)


def _start(tree: Path, label: str, backend: str, redis_url: str, upstream: str, work: Path, team: bool) -> Gateway:
    config = work / f"{label}-{backend}.yaml"
    config.write_text(yaml.safe_dump(_config(redis_url if backend == "redis" else None)))
    env = {
        **os.environ,
        "PYTHONPATH": f"{tree / 'server'}:{tree / 'clients/python/src'}",
        "PYTHONHASHSEED": "0",
    }
    command = [sys.executable, str(Path(__file__).resolve()), "serve", "--config", str(config), "--upstream", upstream]
    if team:
        command.append("--team")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, cwd=work)
    assert process.stdout is not None
    line = process.stdout.readline()
    while line and not line.startswith("PORT "):  # start-up logs come first
        line = process.stdout.readline()
    if not line:
        process.kill()
        raise SystemExit(f"{label}/{backend}: the gateway did not start")
    _, port, _, mode = line.strip().split(" ", 3)
    return Gateway(label, backend, process, int(port), mode)


async def _measure(gateway: Gateway, redis_pid: int, calls: int, streams: int) -> None:
    import grpc  # noqa: PLC0415

    from llm_gateway.v1 import llm_gateway_pb2 as pb  # noqa: PLC0415
    from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc  # noqa: PLC0415

    metadata = (("authorization", f"Bearer {API_KEY}"),)
    generation = pb.GenerationOptions(max_output_tokens=64)

    def request(kind: type[Any], i: int) -> Any:
        text = pb.ContentPart(text=f"quota bench {time.time_ns()} {i}")
        return kind(model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content=[text])], generation=generation)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = pb_grpc.LLMGatewayServiceStub(channel)
        for i in range(20):  # warm-up: connections, scripts loaded
            await stub.Chat(request(pb.ChatRequest, i), metadata=metadata)
            _ = [e async for e in stub.ChatStream(request(pb.ChatStreamRequest, i), metadata=metadata)]
        await asyncio.sleep(0.2)
        started, redis_started = _cpu_s(gateway.process.pid), _cpu_s(redis_pid)
        for i in range(calls):
            await stub.Chat(request(pb.ChatRequest, i), metadata=metadata)
        await asyncio.sleep(0.2)  # let the last settle land
        gateway.unary_ms.append((_cpu_s(gateway.process.pid) - started) / calls * 1000)
        gateway.redis_unary_ms.append((_cpu_s(redis_pid) - redis_started) / calls * 1000)
        started, redis_started = _cpu_s(gateway.process.pid), _cpu_s(redis_pid)
        for i in range(streams):
            events = [e async for e in stub.ChatStream(request(pb.ChatStreamRequest, i), metadata=metadata)]
            assert events[-1].WhichOneof("event") == "final"
        await asyncio.sleep(0.2)
        gateway.stream_ms.append((_cpu_s(gateway.process.pid) - started) / streams * 1000)
        gateway.redis_stream_ms.append((_cpu_s(redis_pid) - redis_started) / streams * 1000)


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


async def _drive(args: argparse.Namespace) -> None:
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
    time.sleep(0.5)
    trees = [("before", Path(args.before).resolve()), ("after", Path(args.after).resolve())]
    gateways: list[Gateway] = []
    with tempfile.TemporaryDirectory() as work:
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
                            args.team,
                        )
                    )
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
    def median(values: list[float]) -> float:
        return statistics.median(values)

    print(f"machine: {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for label, tree in trees:
        print(f"{label}: {tree} at {_commit(tree)}")
    print(f"{args.rounds} rounds of {args.calls} unary calls and {args.streams} streams per gateway, concurrency 1")
    print()
    print("| tree | backend | chain | unary CPU ms/call | stream CPU ms/call | Redis CPU ms/call (unary / stream) |")
    print("|---|---|---|---|---|---|")
    for g in gateways:
        redis_cpu = f"{median(g.redis_unary_ms):.3f} / {median(g.redis_stream_ms):.3f}" if g.backend == "redis" else "–"
        print(
            f"| {g.tree} | {g.backend} | {g.mode} | {median(g.unary_ms):.3f} | {median(g.stream_ms):.3f} | {redis_cpu} |"
        )
    print()
    print("| tree | Redis − memory, unary (ms) | Redis − memory, stream (ms) | per round, unary |")
    print("|---|---|---|---|")
    for label, _ in trees:
        memory, on_redis = (next(g for g in gateways if g.tree == label and g.backend == b) for b in ("memory", "redis"))
        rounds = ", ".join(f"{r - m:+.3f}" for m, r in zip(memory.unary_ms, on_redis.unary_ms, strict=True))
        print(
            f"| {label} | {median(on_redis.unary_ms) - median(memory.unary_ms):+.3f} | "
            f"{median(on_redis.stream_ms) - median(memory.stream_ms):+.3f} | {rounds} |"
        )


def main() -> None:
    """Runs the comparison (see module docstring), or one gateway (`serve`, internal)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="internal: one gateway process")
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--upstream", required=True)
    serve.add_argument("--team", action="store_true")
    parser.add_argument("--before", default=str(ROOT), help="the tree before the change")
    parser.add_argument("--after", default=str(ROOT), help="the tree after the change (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--team", action="store_true", help="the key belongs to a team with limits and a budget")
    args = parser.parse_args()
    if args.command == "serve":
        import uvloop  # noqa: PLC0415

        uvloop.install()
        asyncio.run(_serve(args.config, args.upstream, args.team))
        return
    asyncio.run(_drive(args))


if __name__ == "__main__":
    main()
