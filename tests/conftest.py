"""Shared fixtures: loopback provider emulators, the real grpc.aio gateway on 127.0.0.1:0, and
async generated stubs.

The gateway under test is the real server (`app.start_server`: servicer, health,
reflection) driven through `llm_gateway.v1` stubs over a real channel, from pytest-asyncio
fixtures. pytest-grpc (named in the design card) only runs synchronous `grpc.server` servicers,
so it is used where that fits: `test_client_sync.py` runs the shipped sync client against a sync
test servicer with it.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

# Gateways started without a `database_url` (subprocesses, direct `start_server` calls) keep
# their default SQLite store under $XDG_DATA_HOME/llm-gateway: a directory of this test process,
# never the developer's own ~/.local/share.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="llmgw-test-data-")
os.environ.pop("LLM_GATEWAY_DATA_DIR", None)
os.environ.pop("LLM_GATEWAY_DATABASE_URL", None)
os.environ.pop("LLM_GATEWAY_ADMIN_KEY", None)

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc
from llm_gateway_server.app import RunningServer, start_server
from llm_gateway_server.config import load_settings

from .emulators.ollama_server import OllamaEmulator
from .emulators.openai_server import OpenAIEmulator

OPENAI_TEST_KEY = "sk-test-0123456789abcdefSECRET"


@dataclass
class Gateway:
    """A running gateway and a stub connected to it."""

    running: RunningServer
    channel: grpc.aio.Channel
    stub: pb_grpc.LLMGatewayServiceStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"


@pytest.fixture
async def openai_upstream() -> AsyncIterator[OpenAIEmulator]:
    emulator = OpenAIEmulator()
    await emulator.start()
    yield emulator
    await emulator.stop()


@pytest.fixture
async def ollama_upstream() -> AsyncIterator[OllamaEmulator]:
    emulator = OllamaEmulator()
    await emulator.start()
    yield emulator
    await emulator.stop()


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(tmp_path: Path, migrated_sqlite_template: Path) -> AsyncIterator[GatewayFactory]:
    """Factory: `await make_gateway(environ, **settings_overrides)` starts a gateway on port 0.

    Each gateway gets its own control-plane store (a copy of a migrated SQLite file in the test's
    temporary directory) unless the test passes `database_url`."""
    started: list[Gateway] = []
    made = 0

    async def make(environ: dict[str, str], **overrides: Any) -> Gateway:
        # One attempt per deployment unless a test asks for retries: adapter tests count upstream
        # calls to show the SDKs' own retries are off (tests/test_resilience.py covers retries).
        nonlocal made
        made += 1
        directory = tmp_path / f"gateway-{made}"
        directory.mkdir()
        defaults = {
            "port": 0,
            "grace_period_s": 0.5,
            "retry": {"max_attempts": 1},
            "metrics_port": 0,
            "database_url": copy_sqlite_template(migrated_sqlite_template, directory),
        }
        settings = load_settings(environ=environ, overrides={**defaults, **overrides})
        running = await start_server(settings, environ)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        gateway = Gateway(running, channel, pb_grpc.LLMGatewayServiceStub(channel))
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.channel.close()
        await gateway.running.stop()


@pytest.fixture
async def gateway(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, ollama_upstream: OllamaEmulator
) -> Gateway:
    """A gateway with an OpenAI-compatible provider and an Ollama provider on the emulators,
    configured only through the SDKs' standard environment variables."""
    return await make_gateway(
        {
            "OPENAI_API_KEY": OPENAI_TEST_KEY,
            "OPENAI_BASE_URL": openai_upstream.base_url,
            "OLLAMA_HOST": ollama_upstream.host,
        }
    )


def user(text: str) -> pb.Message:
    """A user message with one text part."""
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=text)])


def chat(model: str, text: str = "Hi", **fields: Any) -> pb.ChatRequest:
    return pb.ChatRequest(model=model, messages=[user(text)], **fields)


def chat_stream(model: str, text: str = "Hi", **fields: Any) -> pb.ChatStreamRequest:
    return pb.ChatStreamRequest(model=model, messages=[user(text)], **fields)


@dataclass
class RichError:
    """A failed call's status and its `google.rpc.Status` details."""

    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo
    retry: error_details_pb2.RetryInfo | None
    bad_request: error_details_pb2.BadRequest | None
    trailers: dict[str, str]


def rich_error(error: grpc.aio.AioRpcError) -> RichError:
    """Decodes a failed call; asserts exactly one ErrorInfo is present."""
    trailers = error.trailing_metadata() or ()
    raw = next(v for k, v in trailers if k == "grpc-status-details-bin")
    status = status_pb2.Status.FromString(raw)
    assert status.code == error.code().value[0]
    infos, retry, bad = [], None, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
    assert len(infos) == 1, status
    assert infos[0].domain == "llm-gateway"
    return RichError(
        error.code(), error.details() or "", infos[0], retry, bad, {k: v for k, v in trailers if isinstance(v, str)}
    )


async def expect_error(call: Awaitable[Any]) -> RichError:
    """Awaits a call that must fail and returns its decoded status."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return rich_error(caught.value)


async def collect(call: Any) -> list[pb.ChatStreamResponse]:
    """All messages of a server stream."""
    return [message async for message in call]


# Tests that start gateway processes (`python -m llm_gateway_server`: about a second of CPU each for
# its imports) and time what those processes do: under pytest-xdist (`make test`: `-n 2 --dist
# loadgroup`) they all run on one worker, one at a time, beside the other worker's in-process tests,
# rather than two such process starts at once on two cores.
GATEWAY_PROCESSES = pytest.mark.xdist_group("gateway_processes")

# Options for a channel to a gateway process that is still starting. A refused connection is
# retried after gRPC's reconnect backoff (1 s, then 1.6 s, 2.56 s... ±20 % jitter), so
# `channel_ready()` came back up to ~1.5 s after the process began to listen (it takes ~1-2 s to
# start), once or twice per process start in the suite. Retrying after 50 ms (at most 250 ms
# between attempts) makes it return within a retry of the port opening. The connect timeout
# (`grpc.min_reconnect_backoff_ms`, 20 s) is left alone: a slow accept on a busy machine is fine.
FAST_RECONNECT: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Makes `--dist=loadgroup` group again under pytest >= 9.2 (pytest-xdist issue #1386).

    An xdist worker tells the controller each test's group by appending `@<group>` to its node id
    (`xdist/remote.py` sets `item._nodeid`). pytest 9.2 keeps node ids in a structured `item._id`
    and no longer reads `_nodeid`, so the suffix is silently lost and every `xdist_group` test is
    scheduled on its own: gateway-process tests ran on both workers at once and the hostile-input
    module was split (two module gateways; `test_zz_no_violations_seen` saw half the calls). This
    hook runs after xdist's (trylast) and sets the same suffix on the structured id. It does
    nothing without `--dist=loadgroup`, on pytest < 9.2, or once xdist's own suffix takes effect.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import coerce_node_id
    except ImportError:  # pytest < 9.2: xdist's `_nodeid` suffix works
        return
    for item in items:
        groups = {
            str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            for mark in item.iter_markers("xdist_group")
        }
        if not groups:
            continue
        suffix = "@" + "_".join(sorted(groups))
        if not item.nodeid.endswith(suffix) and hasattr(item, "_id"):
            item._id = coerce_node_id(item.nodeid + suffix)


_PORT_BLOCK = 1000  # ports per pytest process (the xdist controller or a worker)
_PORTS_FROM = 20000  # below the kernel's ephemeral range (32768-60999 by default)
_handed_out: set[int] = set()
_port_rng = random.Random()  # its own generator: hypothesis seeds the global one in examples


def _port_block() -> range:
    """This process's ports for `free_port`: outside the ephemeral range (bind(0) and outgoing
    connections never take them), one block per xdist worker (`gw0` → the second block; no xdist →
    the first), so parallel workers never hand out the same port. Falls back to the whole range
    below the ephemeral one if that is too small for blocks (empty if there is none: `free_port`
    then takes the kernel's bind(0) choice)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as file:
            ephemeral_low = int(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    slot = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    blocks = (ephemeral_low - _PORTS_FROM) // _PORT_BLOCK
    if blocks < 2:
        return range(1024, ephemeral_low) if ephemeral_low > 2048 else range(0)
    start = _PORTS_FROM + (slot % blocks) * _PORT_BLOCK
    return range(start, start + _PORT_BLOCK)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host`, for a server that binds it later (a subprocess, a metrics
    endpoint). Taken at random from this process's block (`_port_block`) and never handed out twice
    in one process: a port from bind(0) could be taken by an outgoing connection or another xdist
    worker's bind(0) before its server binds it."""
    import socket

    candidates = [p for p in _port_block() if p not in _handed_out]
    _port_rng.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:  # no block (an unusual ephemeral range): the kernel's choice
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A throwaway `redis-server` on a free loopback port."""

    process: Any
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def redis_server() -> Any:
    """Starts a real redis-server (no persistence) for the test and stops it afterwards."""
    import shutil
    import subprocess
    import time

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (Debian package redis-server); Redis features need a real server")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    server = RedisServer(process, port)
    yield server
    if process.poll() is None:
        server.kill()


# --- the control plane's database: SQLite files, PostgreSQL schemas, a throwaway PostgreSQL ------

MACHINE_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"  # trust auth; `.ci/run` starts it
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def run_async(factory: Callable[[], Awaitable[Any]]) -> Any:
    """Runs `await factory()` on a fresh event loop in a fresh thread (sync fixtures and tests can
    use it whatever loop pytest-asyncio has set on the main thread)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    async def main() -> Any:
        return await factory()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


@dataclass(frozen=True)
class PostgresSchema:
    """A fresh, empty schema on the machine's PostgreSQL, dropped after the test.

    Attributes:
        schema: its name, `t_<uuid hex>`.
        url: `postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3D<schema>&application_name=<schema>`:
            every connection made from it (the store's pool and Alembic's version table
            included) works in that schema. Give it to `open_store` (after
            `resolve_database_url`) or to a gateway as `database_url` (setting, YAML or
            `LLM_GATEWAY_DATABASE_URL`): `await make_gateway(env, database_url=postgres_url.url)`.
    """

    schema: str
    url: str


async def _postgres_admin(url: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def postgres_url() -> Iterator[PostgresSchema]:
    """A fresh schema on the machine's PostgreSQL (127.0.0.1:5432, database `test`) for this test;
    safe under xdist (a uuid per test). Teardown ends the connections still open on it (found by
    `application_name`) and drops it CASCADE. Fails (never skips) when PostgreSQL is unreachable."""
    import uuid

    schema = f"t_{uuid.uuid4().hex}"
    try:
        run_async(lambda: _postgres_admin(MACHINE_POSTGRES, f'CREATE SCHEMA "{schema}"'))
    except (OSError, TimeoutError) as exc:
        pytest.fail(f"PostgreSQL at {MACHINE_POSTGRES} is unreachable ({exc}); `.ci/run` starts it")
    url = f"{MACHINE_POSTGRES}?options=-csearch_path%3D{schema}&application_name={schema}"
    yield PostgresSchema(schema, url)
    run_async(
        lambda: _postgres_admin(
            MACHINE_POSTGRES,
            "SET lock_timeout = '20s'",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{schema}'",
            f'DROP SCHEMA "{schema}" CASCADE',
        )
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """`sqlite:////<tmp>/gateway.db`: a SQLite file (not created yet) in the test's directory."""
    return f"sqlite:///{tmp_path / 'gateway.db'}"


@pytest.fixture(scope="session")
def migrated_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once per session (per xdist worker); copy it with
    `copy_sqlite_template` (or use `migrated_sqlite_url`) rather than opening it."""
    from llm_gateway_server.store.sql import upgrade

    path = tmp_path_factory.mktemp("store-template") / "gateway.db"
    run_async(lambda: upgrade(f"sqlite+aiosqlite:///{path}"))
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert not leftovers, f"the template is not checkpointed into one file: {leftovers}"
    return path


def copy_sqlite_template(template: Path, directory: Path) -> str:
    """Copies the migrated template into `directory` and returns its `sqlite:///` URL (a store
    or gateway opened on it finds it at head and skips migrations)."""
    import shutil

    target = directory / "gateway.db"
    shutil.copyfile(template, target)
    return f"sqlite:///{target}"


@pytest.fixture
def migrated_sqlite_url(tmp_path: Path, migrated_sqlite_template: Path) -> str:
    """`sqlite:///` URL of a copy of the migrated template in the test's directory."""
    return copy_sqlite_template(migrated_sqlite_template, tmp_path)


_PG_TEMPLATE: dict[str, Path] = {}  # "data": this process's initdb output (`ThrowawayPostgres.init`)


class ThrowawayPostgres:
    """A PostgreSQL server of the machine's binaries (`PG_BIN`) started for one test, on a free
    loopback port, with its data directory under /tmp (owned by the `postgres` user when the
    tests run as root). `stop()` takes it away (connections drop, new ones are refused),
    `start()` brings it back on the same port with the same data.

    Attributes:
        port: its TCP port on 127.0.0.1. url: `postgresql://postgres@127.0.0.1:<port>/postgres`
            (trust auth).
    """

    def __init__(self) -> None:
        import os
        import shutil
        import tempfile

        self.root = Path(tempfile.mkdtemp(prefix="llmgw-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.running = False
        self._as_postgres = os.geteuid() == 0  # initdb and postgres refuse to run as root
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        import subprocess

        command = [*(["runuser", "-u", "postgres", "--"] if self._as_postgres else []), *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.fail(f"throwaway PostgreSQL: {' '.join(args[:2])} failed: {exc}")
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            pytest.fail(
                f"throwaway PostgreSQL: {Path(args[0]).name} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-2000:]}\n{log}"
            )

    def init(self) -> None:
        """A fresh data directory: a copy (`cp -a`, ~0.05 s) of one initdb (trust auth, user
        postgres, no fsync) made once per pytest process, since initdb itself takes ~0.5-1 s and
        several tests need a server of their own. The template never runs a server, so every copy
        starts as initdb left it."""
        if not (PG_BIN / "initdb").exists():
            pytest.fail(f"PostgreSQL binaries not found in {PG_BIN} (Debian package postgresql-15)")
        template = _PG_TEMPLATE.get("data")
        if template is None:
            import atexit
            import shutil
            import tempfile

            holder = Path(tempfile.mkdtemp(prefix="llmgw-pg-template-", dir="/tmp"))
            atexit.register(shutil.rmtree, holder, ignore_errors=True)
            if self._as_postgres:
                shutil.chown(holder, "postgres", "postgres")
            template = holder / "data"
            self._run(
                str(PG_BIN / "initdb"), "-D", str(template), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                "--no-locale", "--no-sync", "--no-instructions",
            )  # fmt: skip
            _PG_TEMPLATE["data"] = template
        self._run("cp", "-a", str(template), str(self.data))

    def start(self) -> None:
        """Starts the server and waits until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stops the server (`mode`: pg_ctl's "fast" or "immediate") and waits until it is down."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def destroy(self) -> None:
        """Stops it if running and deletes its directory."""
        import shutil

        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    """A real PostgreSQL server for this test alone (see `ThrowawayPostgres`), e.g. to take the
    database away mid-run: `throwaway_postgres.stop(); ...; throwaway_postgres.start()`. Fails
    with the reason (never skips) when it cannot start. Startup costs about a second (initdb)."""
    server = ThrowawayPostgres()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()
