"""`llm-gateway serve --workers N`: N server processes on one port (SO_REUSEPORT), so every core
serves; the kernel spreads connections across them. The parent supervises, and serves the
metrics of all of them on `metrics_port` (0 stays disabled): it creates an empty directory,
passes it to every worker as `PROMETHEUS_MULTIPROC_DIR` (prometheus-client's multiprocess mode:
the workers write their values there and serve no HTTP), serves one `/metrics` with the counters
and histograms summed over every worker (a restarted worker's counts stay), drops an exited
worker's live gauges, and removes the directory when it exits (`telemetry.metrics.SharedMetrics`).

Start: each worker gets one end of a socket pair (`LLM_GATEWAY_WORKER_FD`, passed with
`pass_fds`) and writes `READY` to it once its gRPC server is up, or `FAILED` and a
one-line reason when it cannot start. The supervisor waits for every worker: if one fails (or
exits, or is not ready within `RestartPolicy.start_timeout_s`), it stops the others, prints
`llm-gateway: worker <i>: <reason>` and exits 2 — never a half-started gateway. The same socket
tells a worker its supervisor is gone (EOF): it then drains and exits instead of living on as an
orphan.

Running: a worker that exits is logged (`worker_exited`: index, pid, exit code or signal,
uptime, restart delay) and restarted after a backoff (`RestartPolicy`: 0.25 s doubling to 8 s;
a worker that served 10 s starts over). A worker that keeps failing fast (5 exits in a row, each
before it was ready or within 10 s of it) stops the supervisor: `worker_crash_loop`, one line on
stderr, the other workers drained, exit 1.

Stop: SIGTERM/SIGINT are forwarded to every worker (ready workers drain; starting ones get
SIGTERM), nothing is restarted while draining, and the supervisor exits 0 when every worker that
was serving exited 0 (1 otherwise, or when a worker outlives `grace_period_s` + `stop_timeout_s`
and is killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from .config import Settings
from .telemetry.metrics import SharedMetrics

log = structlog.get_logger(__name__)
REUSE_PORT_ENV = "LLM_GATEWAY_REUSE_PORT"
WORKER_FD_ENV = "LLM_GATEWAY_WORKER_FD"
WORKER_INDEX_ENV = "LLM_GATEWAY_WORKER_INDEX"
READY = b"R"
FAILED = b"E"


@dataclass(frozen=True)
class RestartPolicy:
    """When the supervisor restarts a worker, and when it gives up.

    Attributes:
        base_delay_s / max_delay_s: restart delay after the first fast failure, doubled after each
            further one, capped.
        stable_after_s: a worker that was ready this long before exiting is not failing fast: its
            count (and delay) start over.
        max_fast_failures: this many fast failures in a row (exits before ready or before
            `stable_after_s`) stop the supervisor.
        start_timeout_s: a worker not ready this long after its spawn has failed to start.
        stop_timeout_s: how long past `grace_period_s` a stopping worker may take before SIGKILL.
    """

    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    stable_after_s: float = 10.0
    max_fast_failures: int = 5
    start_timeout_s: float = 60.0
    stop_timeout_s: float = 10.0

    def delay(self, failures: int) -> float:
        """The restart delay after `failures` fast failures in a row (1 for the first)."""
        return float(min(self.max_delay_s, self.base_delay_s * 2 ** max(0, failures - 1)))

    def failures_after(self, failures: int, uptime_s: float) -> int:
        """The fast-failure count after an exit `uptime_s` after ready (0 if never ready)."""
        return 1 if uptime_s >= self.stable_after_s else failures + 1

    def gives_up(self, failures: int) -> bool:
        """True when `failures` fast failures in a row are too many to restart again."""
        return failures >= self.max_fast_failures


RESTART_POLICY = RestartPolicy()


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


def _exit_fields(returncode: int | None) -> dict[str, Any]:
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return {"exit_code": returncode, "signal": name}
    return {"exit_code": returncode, "signal": None}


def _describe_exit(returncode: int | None) -> str:
    fields = _exit_fields(returncode)
    return f"killed by {fields['signal']}" if fields["signal"] else f"exit status {returncode}"


# --- the worker's side ------------------------------------------------------------------------


class SupervisorChannel:
    """A worker's end of the socket pair its supervisor passed in `LLM_GATEWAY_WORKER_FD`."""

    def __init__(self, sock: socket.socket, index: int) -> None:
        self._sock = sock
        self.index = index

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SupervisorChannel | None:
        """The channel when this process is a `--workers` worker, else None. Not inherited by
        the worker's own children."""
        env = os.environ if environ is None else environ
        raw_fd, raw_index = env.get(WORKER_FD_ENV), env.get(WORKER_INDEX_ENV, "0")
        if not raw_fd:
            return None
        try:
            sock = socket.socket(fileno=int(raw_fd))
            index = int(raw_index)
        except (ValueError, OSError):
            return None
        sock.set_inheritable(False)
        sock.setblocking(True)
        return cls(sock, index)

    def failed(self, reason: str) -> bool:
        """Tells the supervisor this worker cannot start, and why; False if it could not be told."""
        try:
            self._sock.sendall(FAILED + reason.encode("utf-8", "replace"))
        except OSError:
            return False
        finally:
            self._sock.close()
        return True

    def ready(self) -> None:
        """Tells the supervisor this worker serves; from then on, the supervisor's end closing
        (the supervisor died) makes the worker drain and exit (SIGTERM to itself). Runs in the
        worker's event loop."""
        try:
            self._sock.sendall(READY)
        except OSError:
            self._supervisor_gone()
            return
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(1)
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._supervisor_gone()

    def _supervisor_gone(self) -> None:
        log.warning("supervisor_gone", worker=self.index, note="the supervisor exited: draining")
        os.kill(os.getpid(), signal.SIGTERM)


# --- the supervisor ---------------------------------------------------------------------------


class _FatalError(Exception):
    """Stops the supervisor: `line` goes to stderr, `status` is the exit status."""

    def __init__(self, line: str, status: int) -> None:
        super().__init__(line)
        self.line = line
        self.status = status


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    channel: socket.socket
    spawned_at: float
    ready_at: float | None = None

    def close(self) -> None:
        self.channel.close()


@dataclass
class _Supervisor:
    count: int
    argv: list[str]
    settings: Settings
    policy: RestartPolicy
    live: dict[int, _Worker] = field(default_factory=dict)
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    unclean: list[str] = field(default_factory=list)
    initially_ready: int = 0
    metrics: SharedMetrics | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        tasks = [asyncio.create_task(self._keep(index)) for index in range(self.count)]
        fatal: _FatalError | None = None
        pending: set[asyncio.Task[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                exc = task.exception()
                if exc is None or fatal is not None:
                    continue
                if isinstance(exc, _FatalError):
                    fatal = exc
                else:
                    log.error("supervisor_error", exc_info=exc)
                    fatal = _FatalError(f"llm-gateway: supervisor error: {exc!r}", 1)
                self._drain(signal.SIGTERM)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if fatal is not None:
            log.info("workers_stopped", status=fatal.status)
            print(fatal.line, file=sys.stderr)
            return fatal.status
        status = 1 if self.unclean else 0
        log.info("workers_stopped", status=status, unclean=self.unclean)
        return status

    def _on_sighup(self) -> None:
        """SIGHUP: with TLS on, every ready worker re-reads its certificate files; without TLS it
        has nothing to reload (and a worker's default SIGHUP action would stop it), so it is ignored."""
        tls = self.settings.tls.cert_file is not None
        log.info("workers_sighup", action="forwarded" if tls else "ignored (TLS off)")
        if tls:
            for worker in self.live.values():
                if worker.ready_at is not None:
                    self._signal(worker, signal.SIGHUP)

    def _on_signal(self, signum: int) -> None:
        log.info("workers_draining", signal=signal.Signals(signum).name, workers=len(self.live))
        self._drain(signum)

    def _drain(self, signum: int) -> None:
        """Stops every worker (again, on a second signal) and restarts none from now on."""
        first = not self.draining.is_set()
        self.draining.set()
        for worker in self.live.values():
            self._signal(worker, signum if worker.ready_at is not None else signal.SIGTERM)
        if first:
            deadline = self.settings.grace_period_s + self.policy.stop_timeout_s
            asyncio.get_running_loop().call_later(deadline, self._kill_stragglers)

    def _kill_stragglers(self) -> None:
        for worker in self.live.values():
            log.error("worker_killed", worker=worker.index, pid=worker.process.pid, note="did not stop in time")
            self.unclean.append(f"worker {worker.index} did not stop in time")
            self._signal(worker, signal.SIGKILL)

    @staticmethod
    def _signal(worker: _Worker, signum: int) -> None:
        if worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)

    async def _spawn(self, index: int) -> _Worker:
        mine, theirs = socket.socketpair()
        env = {
            **os.environ,
            REUSE_PORT_ENV: "1",
            WORKER_FD_ENV: str(theirs.fileno()),
            WORKER_INDEX_ENV: str(index),
            **(self.metrics.environment() if self.metrics is not None else {}),
        }
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "llm_gateway_server",
                *self.argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                # Ctrl-C reaches the supervisor only, which forwards it in order (no KeyboardInterrupt
                # tracebacks from workers still starting).
                start_new_session=True,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        worker = _Worker(index, process, mine, time.monotonic())
        self.live[index] = worker
        if self.draining.is_set():  # the stop signal came while this worker was being spawned
            self._signal(worker, signal.SIGTERM)
        return worker

    async def _until_ready(self, worker: _Worker) -> str | None:
        """None once `worker` is ready; otherwise why it is not (it has then exited)."""
        loop = asyncio.get_running_loop()
        data = b""
        try:
            async with asyncio.timeout(self.policy.start_timeout_s):
                while chunk := await loop.sock_recv(worker.channel, 4096):
                    data += chunk
                    if data.startswith(READY):
                        return None
        except TimeoutError:
            self._signal(worker, signal.SIGKILL)
            await worker.process.wait()
            return f"not ready after {self.policy.start_timeout_s:g} s"
        returncode = await worker.process.wait()
        if data.startswith(FAILED) and len(data) > 1:
            return data[1:].decode("utf-8", "replace").strip()
        return f"{_describe_exit(returncode)} before it was ready"

    async def _keep(self, index: int) -> None:
        """Runs worker `index` until the supervisor drains, restarting it when it exits.

        Raises:
            _FatalError: it failed its first start (status 2), or keeps failing fast (status 1).
        """
        failures = 0
        first_start = True
        while not self.draining.is_set():
            worker = await self._spawn(index)
            pid = worker.process.pid
            reason = await self._until_ready(worker)
            if reason is None:
                worker.ready_at = time.monotonic()
                log.info("worker_ready", worker=index, pid=pid, start_s=round(worker.ready_at - worker.spawned_at, 3))
                if first_start:
                    self.initially_ready += 1
                    if self.initially_ready == self.count:
                        pids = [w.process.pid for w in self.live.values()]
                        log.info("workers_started", workers=self.count, pids=pids, port=self.settings.port)
                first_start = False
                returncode: int | None = await worker.process.wait()
                uptime_s = time.monotonic() - worker.ready_at
                last = _describe_exit(returncode)
            else:
                returncode = worker.process.returncode
                uptime_s = 0.0
                last = reason
            del self.live[index]
            worker.close()
            if self.metrics is not None:
                self.metrics.process_exited(pid)
            exit_fields = {"worker": index, "pid": pid, **_exit_fields(returncode)}
            if self.draining.is_set():
                if worker.ready_at is not None and returncode != 0:
                    self.unclean.append(f"worker {index}: {last}")
                log.info("worker_exited", **exit_fields, ready=worker.ready_at is not None, restart_in_s=None)
                return
            if first_start:
                log.error("worker_start_failed", **exit_fields, reason=reason)
                raise _FatalError(f"llm-gateway: worker {index}: {reason}", 2)
            failures = self.policy.failures_after(failures, uptime_s)
            if self.policy.gives_up(failures):
                log.warning("worker_exited", **exit_fields, uptime_s=round(uptime_s, 3), reason=last, restart_in_s=None)
                log.error("worker_crash_loop", worker=index, failures=failures, last=last)
                raise _FatalError(
                    f"llm-gateway: worker {index} keeps crashing ({failures} exits in a row within "
                    f"{self.policy.stable_after_s:g} s of starting; last: {last}); stopping",
                    1,
                )
            delay = self.policy.delay(failures)
            log.warning(
                "worker_exited",
                **exit_fields,
                uptime_s=round(uptime_s, 3),
                reason=last,
                failures=failures,
                restart_in_s=delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.draining.wait(), delay)


def run_workers(count: int, argv: Sequence[str], settings: Settings, policy: RestartPolicy | None = None) -> int:
    """Starts `count` workers and supervises them until SIGTERM/SIGINT (module docstring).

    Returns:
        0 when every serving worker drained cleanly; 1 when one did not, or a worker keeps
        crashing; 2 when a worker could not start (nothing is left running).
    Raises:
        MetricsBindError: `metrics_host:metrics_port` cannot be bound (no worker was started).
    """
    if settings.port == 0:
        print("llm-gateway: --workers needs a fixed --port (not 0)", file=sys.stderr)
        return 2
    # Bound before any worker starts (a busy port fails the start, nothing left running).
    metrics = SharedMetrics(settings.metrics_host, settings.metrics_port) if settings.metrics_port else None
    supervisor = _Supervisor(count, _worker_argv(argv), settings, policy or RESTART_POLICY, metrics=metrics)
    try:
        return asyncio.run(supervisor.run())
    finally:
        if metrics is not None:
            metrics.close()
