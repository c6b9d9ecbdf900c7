"""Authentication through the real interceptor chain, and secrets never reaching the logs.

Configured (YAML) keys run through `make_gateway`. Keys created in the control plane's store run
through a gateway built here from the real pieces (`build_application`'s servicer and chain, with
`AuthInterceptor` on a `KeyCache` over a real store: a SQLite file and a PostgreSQL schema), until
`app.py` wires the store in.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from structlog.testing import capture_logs

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc
from llm_gateway_server.app import build_application
from llm_gateway_server.config import ApiKeySettings, ConfigError, KeyCacheSettings, StoreSettings, load_settings
from llm_gateway_server.interceptors.auth import AuthInterceptor, hash_key
from llm_gateway_server.interceptors.base import GatewayInterceptor, InterceptorChain, StreamBehavior, UnaryBehavior
from llm_gateway_server.state.key_events import KeyEvents
from llm_gateway_server.store.base import Store
from llm_gateway_server.store.sql import open_store, resolve_database_url
from llm_gateway_server.tenancy.key_cache import KeyCache
from llm_gateway_server.tenancy.records import KeyRecord, TeamRecord
from llm_gateway_server.transport.call_record import CallRecord, current_call
from llm_gateway_server.transport.server import start_grpc

from .conftest import (
    FAST_RECONNECT,
    GATEWAY_PROCESSES,
    OPENAI_TEST_KEY,
    Gateway,
    GatewayFactory,
    PostgresSchema,
    chat,
    chat_stream,
    collect,
    expect_error,
    free_port,
)
from .emulators.openai_server import OpenAIEmulator

GOOD = "gw-test-key-alpha-0123456789"
OTHER = "gw-test-key-beta-9876543210"
DISABLED = "gw-test-key-disabled-000000"
EXPIRED = "gw-test-key-expired-1111111"
KEYS = [
    {"id": "alpha", "owner": "team-a", "key_sha256": hash_key(GOOD), "allowed_models": ["m", "gpt-*", "status-*"]},
    {"id": "beta", "owner": "team-b", "key_sha256": hash_key(OTHER), "allowed_models": ["gpt-4o-mini"]},
    {"id": "off", "key_sha256": hash_key(DISABLED), "disabled": True},
    {"id": "old", "key_sha256": hash_key(EXPIRED), "expires_at": "2020-01-01T00:00:00Z"},
]


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def secured(make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator) -> Gateway:
    return await make_gateway(
        {"OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": openai_upstream.base_url}, auth={"keys": KEYS}
    )


async def test_valid_key_bearer_and_x_api_key(secured: Gateway) -> None:
    reply = await secured.stub.Chat(chat("m"), metadata=bearer(GOOD))
    assert reply.message.content[0].text == "echo: Hi"
    events = await collect(secured.stub.ChatStream(chat_stream("m"), metadata=(("x-api-key", GOOD),)))
    assert events[-1].WhichOneof("event") == "final"


@pytest.mark.parametrize(
    ("metadata", "code", "reason"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID"),
        (bearer("wrong-key"), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID"),
        ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID"),
        (bearer(DISABLED), grpc.StatusCode.PERMISSION_DENIED, "API_KEY_DISABLED"),
        (bearer(EXPIRED), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_EXPIRED"),
    ],
)
@pytest.mark.parametrize("rpc", ["Chat", "ChatStream", "Embed", "ListModels"])
async def test_rejected_keys(
    secured: Gateway, openai_upstream: OpenAIEmulator, metadata: Any, code: grpc.StatusCode, reason: str, rpc: str
) -> None:
    calls = {
        "Chat": lambda: secured.stub.Chat(chat("m"), metadata=metadata),
        "ChatStream": lambda: collect(secured.stub.ChatStream(chat_stream("m"), metadata=metadata)),
        "Embed": lambda: secured.stub.Embed(pb.EmbedRequest(model="m", inputs=["x"]), metadata=metadata),
        "ListModels": lambda: secured.stub.ListModels(pb.ListModelsRequest(), metadata=metadata),
    }
    error = await expect_error(calls[rpc]())
    assert (error.code, error.info.reason) == (code, reason)
    assert GOOD not in error.message and "wrong-key" not in error.message
    assert not openai_upstream.requests


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((("authorization", "Bearer wrong-key"), ("x-api-key", GOOD)), id="wrong-then-good"),
        pytest.param((("x-api-key", GOOD), ("authorization", "Bearer wrong-key")), id="good-then-wrong"),
        pytest.param((("authorization", f"Bearer {GOOD}"), ("authorization", f"Bearer {GOOD}")), id="good-twice"),
    ],
)
async def test_ambiguous_credentials_are_refused(
    secured: Gateway, openai_upstream: OpenAIEmulator, metadata: Any
) -> None:
    """Found from outside: the first credential won (wrong-then-good refused, good-then-wrong
    admitted). The rule now: exactly one credential, else UNAUTHENTICATED."""
    error = await expect_error(secured.stub.Chat(chat("m"), metadata=metadata))
    assert (error.code, error.info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")
    assert "more than one credential" in error.message
    assert not openai_upstream.requests


async def test_model_not_allowed(secured: Gateway, openai_upstream: OpenAIEmulator) -> None:
    error = await expect_error(secured.stub.Chat(chat("m"), metadata=bearer(OTHER)))
    assert (error.code, error.info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED")
    assert error.info.metadata["key_id"] == "beta" and error.info.metadata["model"] == "m"
    fallback = pb.RoutingOptions(fallback_models=["claude-haiku-4-5"])
    error = await expect_error(secured.stub.Chat(chat("gpt-4o-mini", routing=fallback), metadata=bearer(OTHER)))
    assert error.info.reason == "MODEL_NOT_ALLOWED" and error.info.metadata["model"] == "claude-haiku-4-5"
    assert (await secured.stub.Chat(chat("gpt-4o-mini"), metadata=bearer(OTHER))).provider == "openai"
    assert len(openai_upstream.requests) == 1


async def test_health_and_reflection_need_no_key(secured: Gateway) -> None:
    health = health_pb2_grpc.HealthStub(secured.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
    call = reflection_pb2_grpc.ServerReflectionStub(secured.channel).ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    await call.done_writing()
    reply = await call.read()
    assert "llm_gateway.v1.LLMGatewayService" in {s.name for s in reply.list_services_response.service}


async def test_no_keys_refuses_non_loopback_unless_disabled(make_gateway: GatewayFactory) -> None:
    with pytest.raises(ConfigError, match=r"refusing to serve on 0\.0\.0\.0"):
        await make_gateway({}, host="0.0.0.0")
    gateway = await make_gateway({}, host="0.0.0.0", auth={"disabled": True}, tls={"allow_plaintext": True})
    assert (await gateway.stub.ListModels(pb.ListModelsRequest())).total_size > 0


def test_hash_key_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llm_gateway_server", "hash-key"],
        input=GOOD + "\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert result.stdout.strip() == hash_key(GOOD)


@GATEWAY_PROCESSES
async def test_no_log_line_contains_a_gateway_or_provider_key(openai_upstream: OpenAIEmulator, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    keys_yaml = "\n".join(f"    - {{id: '{k['id']}', key_sha256: {k['key_sha256']}}}" for k in KEYS)
    config.write_text(f"auth:\n  keys:\n{keys_yaml}\nlog_level: debug\nmetrics_port: 0\n")
    env = {"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": openai_upstream.base_url}
    process = subprocess.Popen(  # noqa: ASYNC220 - a real process, so its stdout is the real log stream
        [sys.executable, "-m", "llm_gateway_server", "serve", "--port", str(port), "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT) as channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), 20)
            except TimeoutError:
                process.kill()
                pytest.fail(f"gateway did not start: {process.communicate()[0]}")
            stub = pb_grpc.LLMGatewayServiceStub(channel)
            await stub.Chat(chat("m"), metadata=bearer(GOOD))
            for model in ("status-401", "status-500"):  # upstream errors are logged with their details
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Chat(chat(model), metadata=bearer(GOOD))
            for metadata in (bearer("wrong-secret-key-123"), (("x-api-key", "another-secret-456"),)):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Chat(chat("m"), metadata=metadata)
        process.terminate()
        output, _ = await asyncio.to_thread(process.communicate, timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert sum('"event": "rpc"' in line for line in lines) == 5
    assert any('"upstream_status": "401"' in line for line in lines)
    for secret in (GOOD, OPENAI_TEST_KEY, "wrong-secret-key-123", "another-secret-456", "sk-abc"):
        assert secret not in output, secret


# --- keys from the control plane's store, through a gateway built from the real pieces ---------

DB_SECRET = "gw-db-secret-key-0123456789abcdef"
TEAM_SECRET = "gw-db-team-key-0123456789abcdef"


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A migrated SQLite file of the test's own, then a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        url = request.getfixturevalue("migrated_sqlite_url")
    else:
        schema: PostgresSchema = request.getfixturevalue("postgres_url")
        url = schema.url
    opened = await open_store(resolve_database_url(url, Path("unused")), StoreSettings(timeout_s=5.0))
    yield opened
    await opened.aclose()


class Recorder(GatewayInterceptor):
    """Runs right after auth: keeps each call's record (what auth noted on it)."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    def _note(self) -> None:
        record = current_call.get()
        assert record is not None
        self.records.append(record)

    async def unary(
        self, inner: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        self._note()
        return await inner(request, context)

    async def stream(
        self, inner: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        self._note()
        async for item in inner(request, context):
            yield item


@dataclass
class Served:
    """A gateway whose auth layer the test chose."""

    stub: pb_grpc.LLMGatewayServiceStub
    recorder: Recorder
    cache: KeyCache
    auth: AuthInterceptor


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(openai_upstream: OpenAIEmulator, tmp_path: Path) -> AsyncIterator[ServeFactory]:
    """`await serve(store, configured=(), anonymous=False)`: the real servicer and interceptor
    chain (observability → auth → recorder → validation → ...) with `AuthInterceptor` on a
    `KeyCache` over `store`, on 127.0.0.1:0."""
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def make(
        store: Store | None, configured: tuple[ApiKeySettings, ...] = (), anonymous: bool = False, **cache: Any
    ) -> Served:
        environ = {"OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": openai_upstream.base_url}
        overrides = {
            "port": 0,
            "metrics_port": 0,
            "retry": {"max_attempts": 1},
            "auth": {"disabled": True},  # the chain without auth: this test's auth goes in below
            "data_dir": str(tmp_path / "app-data"),
        }
        settings = load_settings(environ=environ, overrides=overrides)
        application = await build_application(settings, environ)
        key_cache = KeyCache(store, configured, KeyCacheSettings(**cache), timeout_s=2.0)
        await key_cache.start()
        auth = AuthInterceptor(key_cache, anonymous_when_no_keys=anonymous)
        recorder = Recorder()
        (chain,) = application.interceptors
        assert isinstance(chain, InterceptorChain)
        layers = [layer for layer in chain.layers if not isinstance(layer, AuthInterceptor)]
        layers[1:1] = [auth, recorder]  # right after observability, as app.py places auth
        server = await start_grpc(
            application.servicer,
            [InterceptorChain(layers)],
            host="127.0.0.1",
            port=0,
            max_message_bytes=settings.max_message_bytes,
            reuse_port=False,
            grace_period_s=0.2,
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")

        async def cleanup() -> None:
            await channel.close()
            await server.stop()
            await application.aclose()
            await key_cache.aclose()

        cleanups.append(cleanup)
        return Served(pb_grpc.LLMGatewayServiceStub(channel), recorder, key_cache, auth)

    yield make
    for cleanup in cleanups:
        await cleanup()


async def add_key(store: Store, key_id: str, secret: str, **fields: Any) -> KeyRecord:
    return await store.create_key(KeyRecord(id=key_id, display_name=key_id, secret_sha256=hash_key(secret), **fields))


async def test_a_database_key_through_the_server(store: Store, serve: ServeFactory) -> None:
    """A key created in the store works at once; the call record names its tenant, key, owner
    and scope; revoked (and published), it is refused on every RPC."""
    key = await add_key(store, "k1", DB_SECRET, owner="acme")
    served = await serve(store)
    assert (await served.stub.Chat(chat("m"), metadata=bearer(DB_SECRET))).message.content[0].text == "echo: Hi"
    events = await collect(served.stub.ChatStream(chat_stream("m"), metadata=(("x-api-key", DB_SECRET),)))
    assert events[-1].WhichOneof("event") == "final"
    for record in served.recorder.records:
        assert record.tenant is not None and record.tenant.key.id == "k1"
        assert (record.key_id, record.owner, record.scope) == ("k1", "acme", "keys/k1")

    await store.update_key(replace(key, revoke_time=datetime.now(UTC)))
    assert not await KeyEvents(served.cache, None).key_changed("k1")  # no Redis: this process only
    calls = {
        "Chat": lambda: served.stub.Chat(chat("m"), metadata=bearer(DB_SECRET)),
        "ChatStream": lambda: collect(served.stub.ChatStream(chat_stream("m"), metadata=bearer(DB_SECRET))),
        "Embed": lambda: served.stub.Embed(pb.EmbedRequest(model="m", inputs=["x"]), metadata=bearer(DB_SECRET)),
        "ListModels": lambda: served.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(DB_SECRET)),
    }
    for call in calls.values():
        error = await expect_error(call())
        assert (error.code, error.info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")
        assert DB_SECRET not in error.message


async def test_team_and_key_globs_both_apply(
    store: Store, serve: ServeFactory, openai_upstream: OpenAIEmulator
) -> None:
    """A model must match the key's globs and its team's; empty globs allow every model."""
    await store.create_team(TeamRecord("research", "Research", allowed_models=("gpt-*", "m")))
    await add_key(store, "open", DB_SECRET, team_id="research")  # key: every model; team: gpt-*, m
    await add_key(store, "narrow", TEAM_SECRET, team_id="research", allowed_models=("gpt-4o-mini",))
    served = await serve(store)

    assert (await served.stub.Chat(chat("m"), metadata=bearer(DB_SECRET))).provider == "openai"
    error = await expect_error(served.stub.Chat(chat("claude-haiku-4-5"), metadata=bearer(DB_SECRET)))
    assert (error.code, error.info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED")
    assert error.info.metadata["team_id"] == "research" and error.info.metadata["model"] == "claude-haiku-4-5"
    fallback = pb.RoutingOptions(fallback_models=["claude-haiku-4-5"])
    error = await expect_error(served.stub.Chat(chat("m", routing=fallback), metadata=bearer(DB_SECRET)))
    assert error.info.reason == "MODEL_NOT_ALLOWED" and error.info.metadata["model"] == "claude-haiku-4-5"

    error = await expect_error(served.stub.Chat(chat("m"), metadata=bearer(TEAM_SECRET)))  # the key's globs
    assert error.info.reason == "MODEL_NOT_ALLOWED" and "team_id" not in error.info.metadata
    assert (await served.stub.Chat(chat("gpt-4o-mini"), metadata=bearer(TEAM_SECRET))).provider == "openai"
    assert len(openai_upstream.requests) == 2


async def test_anonymous_until_a_key_exists(store: Store, serve: ServeFactory) -> None:
    """On a loopback bind (`anonymous_when_no_keys`) with no key at all, calls pass without one
    (whatever they send, as before keys existed); as soon as a key exists, every call needs one."""
    served = await serve(store, anonymous=True)
    assert (await served.stub.Chat(chat("m"))).message.content[0].text == "echo: Hi"
    await served.stub.Chat(chat("m"), metadata=bearer("anything-at-all"))
    assert all(r.tenant is None and r.key_id == "" for r in served.recorder.records)

    await add_key(store, "k1", DB_SECRET)
    assert not await KeyEvents(served.cache, None).key_created("k1")
    error = await expect_error(served.stub.Chat(chat("m")))
    assert (error.code, error.info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")
    error = await expect_error(served.stub.Chat(chat("m"), metadata=bearer("anything-at-all")))
    assert error.info.reason == "API_KEY_INVALID"
    assert (await served.stub.Chat(chat("m"), metadata=bearer(DB_SECRET))).provider == "openai"


async def test_a_key_created_elsewhere_ends_anonymous_mode_within_the_ttl(store: Store, serve: ServeFactory) -> None:
    served = await serve(store, anonymous=True, ttl_s=0.3)
    await served.stub.Chat(chat("m"))
    await add_key(store, "k1", DB_SECRET)  # through another replica: this one is not told
    await asyncio.sleep(0.35)
    error = await expect_error(served.stub.Chat(chat("m")))
    assert error.info.reason == "API_KEY_INVALID"


async def test_without_anonymous_mode_a_key_is_always_needed(store: Store, serve: ServeFactory) -> None:
    served = await serve(store, anonymous=False)
    for metadata in ((), bearer("anything-at-all")):
        error = await expect_error(served.stub.Chat(chat("m"), metadata=metadata))
        assert (error.code, error.info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")


async def test_the_key_store_unreachable_through_the_server(serve: ServeFactory) -> None:
    """Unknown keys are UNAVAILABLE / KEY_STORE_UNAVAILABLE (with RetryInfo) within the timeout;
    configured keys keep working."""
    dead = await open_store(
        resolve_database_url(f"postgresql://postgres@127.0.0.1:{free_port()}/test", Path("unused")),
        StoreSettings(timeout_s=1.0),
        migrate=False,
    )
    try:
        configured = (ApiKeySettings(id="alpha", key_sha256=hash_key(GOOD)),)
        served = await serve(dead, configured)
        started = asyncio.get_running_loop().time()
        error = await expect_error(served.stub.Chat(chat("m"), metadata=bearer(DB_SECRET)))
        assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, "KEY_STORE_UNAVAILABLE")
        assert error.retry is not None
        assert asyncio.get_running_loop().time() - started < 2.5
        assert (await served.stub.Chat(chat("m"), metadata=bearer(GOOD))).provider == "openai"
        assert served.recorder.records[-1].scope == "keys/alpha"
    finally:
        await dead.aclose()


async def test_is_data_plane_key(store: Store, serve: ServeFactory) -> None:
    await add_key(store, "k1", DB_SECRET)
    await add_key(store, "gone", TEAM_SECRET, revoke_time=datetime.now(UTC))
    served = await serve(store, (ApiKeySettings(id="alpha", key_sha256=hash_key(GOOD)),))
    assert await served.auth.is_data_plane_key(GOOD)
    assert await served.auth.is_data_plane_key(DB_SECRET)
    assert not await served.auth.is_data_plane_key(TEAM_SECRET)  # revoked
    assert not await served.auth.is_data_plane_key("an-admin-secret-perhaps")


async def test_no_log_line_holds_a_secret_or_its_digest(store: Store, serve: ServeFactory) -> None:
    """Accepted, refused, revoked and unknown keys: the RPC log lines name the key id, never a
    secret or its SHA-256."""
    await add_key(store, "k1", DB_SECRET)
    await add_key(store, "gone", TEAM_SECRET, revoke_time=datetime.now(UTC))
    served = await serve(store, (ApiKeySettings(id="alpha", key_sha256=hash_key(GOOD)),))
    secrets = (GOOD, DB_SECRET, TEAM_SECRET, "wrong-secret-key-123")
    with capture_logs() as logs:
        await served.stub.Chat(chat("m"), metadata=bearer(GOOD))
        await served.stub.Chat(chat("m"), metadata=bearer(DB_SECRET))
        for secret in secrets[2:]:
            await expect_error(served.stub.Chat(chat("m"), metadata=bearer(secret)))
        await expect_error(served.stub.Chat(chat("m"), metadata=(("x-api-key", GOOD), ("x-api-key", DB_SECRET))))
        for _ in range(100):  # the server logs a call just after answering it
            if sum(log["event"] == "rpc" for log in logs) == 5:
                break
            await asyncio.sleep(0.01)
    rpc_lines = [log for log in logs if log["event"] == "rpc"]
    assert len(rpc_lines) == 5
    assert {log.get("key_id") for log in rpc_lines} >= {"alpha", "k1"}
    text = repr(logs)
    for secret in secrets:
        assert secret not in text and hash_key(secret) not in text, secret
