"""`serve --workers 2` and one `/metrics`: the supervisor serves every worker's values summed
(prometheus-client multiprocess mode), so N calls spread over both workers scrape as
`requests_total = N`; calls in flight are summed over the live workers; a killed worker's counts
stay in the sums while its live gauges go.

Real processes: the OpenAI emulator (`python -m tests.emulators openai`), the supervisor and its
workers (`python -m llm_gateway_server serve --workers 2`). SO_REUSEPORT spreads connections, not
calls, so each call opens its own connection (a channel with its own subchannel pool).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc

from .conftest import GATEWAY_PROCESSES, chat, free_port
from .test_workers import (
    START_TIMEOUT_S,
    _env,
    _serve_argv,
    _serving,
    _supervisor,
    _wait_until,
    worker_environment,
    workers_by_index,
)

pytestmark = [pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc"), GATEWAY_PROCESSES]

CALLS = 24  # all on one worker by chance: 2 * 2**-24
REPO = Path(__file__).resolve().parents[1]


@contextmanager
def _openai_emulator() -> Iterator[str]:
    """The OpenAI emulator in its own process; yields its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.emulators", "openai", "--port", "0"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "openai emulator on 127.0.0.1:PORT"
        assert " on 127.0.0.1:" in line, line
        yield f"http://{line.rsplit(' ', 1)[1].strip()}/v1"
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def _channel(port: int) -> grpc.Channel:
    """A channel with its own connection (gRPC shares connections between channels by default)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


def _calls(port: int, count: int, model: str = "gpt-4o-mini") -> None:
    for i in range(count):
        with _channel(port) as channel:
            pb_grpc.LLMGatewayServiceStub(channel).Chat(chat(model, f"call {i}"), timeout=10)


def _scrape(port: int) -> list[Any]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return list(text_string_to_metric_families(text))


def _total(families: list[Any], name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in families
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _requests_of(metrics_dir: Path, pid: int) -> float:
    """`requests_total` (Chat) as counted by process `pid` alone, from its own file."""
    files = [str(f) for f in metrics_dir.glob(f"counter_{pid}.db")]
    return _total(list(MultiProcessCollector.merge(files)), "llm_gateway_requests_total", method="Chat")


def test_one_scrape_sums_both_workers() -> None:
    with _openai_emulator() as base_url:
        port, metrics_port = free_port(), free_port()
        env = _env(metrics_port, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=base_url)
        with _supervisor(_serve_argv(port, "--workers", "2"), env) as (process, _lines):
            pids = _wait_until(lambda: workers_by_index(process.pid, port), START_TIMEOUT_S, "both workers")
            _wait_until(lambda: _serving(port), 5, "health SERVING")
            metrics_dir = Path(worker_environment(pids[0])["PROMETHEUS_MULTIPROC_DIR"])

            _calls(port, CALLS)
            families = _scrape(metrics_port)
            requests = _total(families, "llm_gateway_requests_total", method="Chat", model="gpt-4o-mini", code="OK")
            per_worker = {index: _requests_of(metrics_dir, pid) for index, pid in pids.items()}
            print(f"\n{CALLS} calls -> one scrape: requests_total = {requests:g}; per worker pid: {per_worker}")
            assert requests == CALLS
            assert all(count > 0 for count in per_worker.values()), per_worker  # both workers served some
            assert sum(per_worker.values()) == CALLS
            assert _total(families, "llm_gateway_tokens_total", direction="input", model="gpt-4o-mini") == 11 * CALLS
            assert _total(families, "llm_gateway_request_duration_seconds_count", method="Chat") == CALLS
            assert _total(families, "llm_gateway_in_flight_calls", method="Chat") == 0

            # Calls in flight are summed over the workers (livesum), whichever serves them.
            hanging: list[tuple[grpc.Channel, Future[Any]]] = []
            for _ in range(4):
                channel = _channel(port)
                future = pb_grpc.LLMGatewayServiceStub(channel).Chat.future(chat("hang"), timeout=30)
                hanging.append((channel, future))
            _wait_until(
                lambda: _total(_scrape(metrics_port), "llm_gateway_in_flight_calls", method="Chat") == 4,
                10,
                "4 calls in flight",
                poll_s=0.05,
            )
            for channel, future in hanging:
                future.cancel()
                channel.close()
            _wait_until(
                lambda: _total(_scrape(metrics_port), "llm_gateway_in_flight_calls", method="Chat") == 0,
                10,
                "no call in flight",
                poll_s=0.05,
            )

            # A worker that dies: its counts stay (its files do), its live gauges go (mark_process_dead).
            victim = pids[1]
            assert (metrics_dir / f"gauge_livesum_{victim}.db").exists()
            os.kill(victim, signal.SIGKILL)

            def replaced() -> dict[int, int] | None:
                now = workers_by_index(process.pid, port)
                return now if now and now[1] != victim else None

            restarted = _wait_until(replaced, 15, "worker 1 restarted")
            _wait_until(lambda: _serving(port), 5, "health SERVING")
            assert not (metrics_dir / f"gauge_livesum_{victim}.db").exists()
            families = _scrape(metrics_port)
            before = _total(families, "llm_gateway_requests_total", method="Chat", model="gpt-4o-mini", code="OK")
            assert before == CALLS
            _calls(port, CALLS)
            after = _total(
                _scrape(metrics_port), "llm_gateway_requests_total", method="Chat", model="gpt-4o-mini", code="OK"
            )
            print(f"worker 1 killed ({victim} -> {restarted[1]}): requests_total {before:g}, then {after:g}")
            assert after == 2 * CALLS

            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
        deadline = time.monotonic() + 5
        while metrics_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not metrics_dir.exists()
