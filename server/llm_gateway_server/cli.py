"""`llm-gateway` command line: `llm-gateway serve [--host H] [--port N] [--config FILE]`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from .app import serve
from .config import ConfigError, load_settings
from .interceptors.auth import hash_key
from .telemetry.logging import configure_logging
from .workers import run_workers


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
        help="worker processes sharing the port with SO_REUSEPORT (default 1); worker i serves metrics "
        "on metrics_port + i",
    )
    commands.add_parser("hash-key", help="read an API key on stdin, print its key_sha256 for the config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llm-gateway` console script; returns the process exit status
    (0 after a clean drain, 2 for invalid configuration)."""
    args = _parser().parse_args(argv)
    if args.command == "hash-key":
        key = sys.stdin.readline().strip()
        if not key:
            print("llm-gateway: no key on standard input", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0
    try:
        settings = load_settings(args.config, overrides={"host": args.host, "port": args.port})
    except ConfigError as exc:
        print(f"llm-gateway: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_file)
    if args.workers > 1:
        return run_workers(args.workers, argv if argv is not None else sys.argv[1:], settings)
    if settings.event_loop == "uvloop":
        try:
            import uvloop  # noqa: PLC0415 - optional dependency, chosen by configuration
        except ImportError:
            print("llm-gateway: event_loop is uvloop but uvloop is not installed; using asyncio", file=sys.stderr)
        else:
            uvloop.install()
    try:
        asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"llm-gateway: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
