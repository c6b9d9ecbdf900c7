"""`llm-gateway` command line: `llm-gateway serve [--host H] [--port N] [--config FILE] [--workers N]`,
`llm-gateway db upgrade [--config FILE]`, `llm-gateway hash-key`.

Exit status: 0 after a clean drain; 1 when a `--workers` worker keeps crashing or did not drain
cleanly; 2 when the gateway cannot start (invalid configuration, a port that cannot be bound),
with one line per problem on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from . import app
from .config import ConfigError, Settings, load_settings
from .interceptors.auth import hash_key
from .telemetry.logging import configure_logging
from .telemetry.metrics import MetricsBindError
from .transport.server import BindError
from .workers import SupervisorChannel, run_workers

# (the host setting, the port setting) a bind failure names: the host when the address is the problem
_GRPC_SETTINGS = ("host / --host / LLM_GATEWAY_HOST", "port / --port / LLM_GATEWAY_PORT")
_METRICS_SETTINGS = ("metrics_host / LLM_GATEWAY_METRICS_HOST", "metrics_port / LLM_GATEWAY_METRICS_PORT")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-gateway", description="LLM Gateway: one gRPC contract for many LLM providers."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the gRPC server until SIGTERM/SIGINT")
    run.add_argument("--host", help="bind address (default 127.0.0.1, or LLM_GATEWAY_HOST)")
    run.add_argument("--port", type=int, help="gRPC port (default 50051, or LLM_GATEWAY_PORT; 0 picks a free port)")
    run.add_argument("--config", type=Path, help="YAML settings file (providers, models, limits)")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port with SO_REUSEPORT, supervised and restarted when they "
        "exit (default 1); the supervisor serves all workers' metrics, summed, on metrics_port",
    )
    commands.add_parser("hash-key", help="read an API key on stdin, print its key_sha256 for the config file")
    db = commands.add_parser("db", help="the control plane's database (database_url, default SQLite in data_dir)")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_upgrade = db_commands.add_parser("upgrade", help="migrate the database to the latest revision, print it")
    db_upgrade.add_argument("--config", type=Path, help="YAML settings file (database_url, data_dir, store)")
    return parser


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(error: OSError) -> str:
    text = error.strerror or str(error)
    return text[:1].lower() + text[1:]


def _bind_problem(host: str, port: int, *, reuse_port: bool) -> OSError | None:
    """Why host:port cannot be bound (tried with a throwaway socket, bound as gRPC and
    prometheus-client bind: SO_REUSEADDR, and SO_REUSEPORT when the gateway uses it), or None."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return exc
    problem: OSError | None = None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                probe.bind(address)
        except OSError as exc:
            problem = problem or exc
        else:
            return None  # gRPC serves when it binds at least one of the resolved addresses
    return problem


def _cannot_bind(host: str, port: int, error: OSError | None, settings: tuple[str, str]) -> str:
    """`cannot bind H:P (the setting to change): reason`."""
    host_setting, port_setting = settings
    if isinstance(error, socket.gaierror) or (error is not None and error.errno == errno.EADDRNOTAVAIL):
        setting = host_setting
    else:
        setting = port_setting
    reason = _reason(error) if error is not None else "the address could not be bound"
    return f"cannot bind {_address(host, port)} ({setting}): {reason}"


def _fail(problem: str, channel: SupervisorChannel | None) -> int:
    """Reports a start failure (to the supervisor when this is a worker) and returns status 2."""
    if channel is None or not channel.failed(problem):
        print(f"llm-gateway: {problem}", file=sys.stderr)
    return 2


async def _serve(settings: Settings, channel: SupervisorChannel | None) -> None:
    """`app.serve`; a worker also tells its supervisor when it serves (`SupervisorChannel.ready`)."""
    await app.serve(settings, on_ready=None if channel is None else lambda _: channel.ready())


def _db_upgrade(config: Path | None) -> int:
    """`llm-gateway db upgrade`: migrates the configured database to head and prints
    `database <url without password> at revision <rev>`; status 2 (one line on stderr) when the
    settings are invalid or the database cannot be reached or migrated."""
    from .store.base import StoreError  # noqa: PLC0415 - SQLAlchemy and Alembic only for this command
    from .store.sql import resolve_database_url, safe_url, upgrade  # noqa: PLC0415

    try:
        settings = load_settings(config)
        configure_logging(settings.log_level, settings.log_file)
        url = resolve_database_url(settings.database_url, settings.data_dir)
        revision = asyncio.run(upgrade(url, settings.store))
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}", None)
    except (StoreError, ValueError, OSError) as exc:
        return _fail(f"cannot migrate the database: {exc}", None)
    print(f"database {safe_url(url)} at revision {revision}")
    return 0


def _per_process_quotas(settings: Settings) -> str | None:
    """Why `--workers` > 1 must not start: rate limits or budgets are configured (in the settings
    or on keys and teams in the database) and there is no Redis, so each worker would count them
    alone (every limit multiplied by the number of workers). None: it may start."""
    if settings.redis_url:
        return None
    if app.has_configured_quotas(settings):
        where = "in the settings"
    else:
        try:
            stored = asyncio.run(app.stored_quotas(settings))
        except Exception as exc:  # noqa: BLE001 - the workers report a database problem themselves
            print(f"llm-gateway: could not check the database for limits and budgets: {exc}", file=sys.stderr)
            return None
        if not stored:
            return None
        where = f"on {stored} in the database"
    return (
        f"rate limits or budgets are set {where} and there is no Redis (redis_url / REDIS_URL): with --workers "
        "> 1 each worker would count them alone; configure Redis or run one worker"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llm-gateway` console script; returns the process exit status (module
    docstring)."""
    args = _parser().parse_args(argv)
    if args.command == "hash-key":
        key = sys.stdin.readline().strip()
        if not key:
            print("llm-gateway: no key on standard input", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0
    if args.command == "db":
        return _db_upgrade(args.config)
    channel = SupervisorChannel.from_environment()  # set when this process is a --workers worker
    try:
        settings = load_settings(args.config, overrides={"host": args.host, "port": args.port})
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}", channel)
    configure_logging(settings.log_level, settings.log_file)
    # Busy ports are found before the servers try them: gRPC's own error is a C-core log line and a
    # RuntimeError, and a metrics port found busy only after gRPC started leaves that server to be
    # collected noisily. BindError and MetricsBindError below still cover a port taken in between.
    reuse_port = settings.reuse_port and args.workers <= 1  # the supervisor checks that no one else holds it
    problem = _bind_problem(settings.host, settings.port, reuse_port=reuse_port) if settings.port else None
    if problem is not None:
        return _fail(_cannot_bind(settings.host, settings.port, problem, _GRPC_SETTINGS), channel)
    if channel is None and settings.metrics_port:  # workers serve no metrics: their supervisor serves them all
        problem = _bind_problem(settings.metrics_host, settings.metrics_port, reuse_port=False)
        if problem is not None:
            return _fail(_cannot_bind(settings.metrics_host, settings.metrics_port, problem, _METRICS_SETTINGS), None)
    if args.workers > 1:
        refusal = _per_process_quotas(settings)
        if refusal is not None:
            return _fail(refusal, None)
        try:
            return run_workers(args.workers, argv if argv is not None else sys.argv[1:], settings)
        except MetricsBindError as exc:
            return _fail(_cannot_bind(exc.host, exc.port, exc, _METRICS_SETTINGS), None)
    if settings.event_loop == "uvloop":
        try:
            import uvloop  # noqa: PLC0415 - optional dependency, chosen by configuration
        except ImportError:
            print("llm-gateway: event_loop is uvloop but uvloop is not installed; using asyncio", file=sys.stderr)
        else:
            uvloop.install()
    try:
        asyncio.run(_serve(settings, channel))
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}", channel)
    except BindError:
        problem = _bind_problem(settings.host, settings.port, reuse_port=settings.reuse_port)
        return _fail(_cannot_bind(settings.host, settings.port, problem, _GRPC_SETTINGS), channel)
    except MetricsBindError as exc:
        return _fail(_cannot_bind(exc.host, exc.port, exc, _METRICS_SETTINGS), channel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
