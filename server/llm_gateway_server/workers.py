"""`llm-gateway serve --workers N`: N server processes on one port (SO_REUSEPORT), so every core
serves; the kernel spreads connections across them. The parent only supervises: it forwards
SIGTERM/SIGINT (each worker then drains) and exits when they have all stopped. Worker i serves its
metrics on `metrics_port + i` (0 stays disabled)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

import structlog

from .config import Settings

log = structlog.get_logger(__name__)
REUSE_PORT_ENV = "LLM_GATEWAY_REUSE_PORT"


def _worker_argv(argv: Sequence[str]) -> list[str]:
    """The command line minus `--workers N` / `--workers=N`."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return out


def run_workers(count: int, argv: Sequence[str], settings: Settings) -> int:
    """Starts `count` workers and waits for them; returns 0 when all exited cleanly."""
    if settings.port == 0:
        print("llm-gateway: --workers needs a fixed --port (not 0)", file=sys.stderr)
        return 2
    children: list[subprocess.Popen[bytes]] = []
    for index in range(count):
        env = {**os.environ, REUSE_PORT_ENV: "1"}
        if settings.metrics_port:
            env["LLM_GATEWAY_METRICS_PORT"] = str(settings.metrics_port + index)
        children.append(subprocess.Popen([sys.executable, "-m", "llm_gateway_server", *_worker_argv(argv)], env=env))
    log.info("workers_started", workers=count, pids=[c.pid for c in children], port=settings.port)

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    log.info("workers_stopped", exit_codes=codes)
    return 0 if all(code == 0 for code in codes) else 1
