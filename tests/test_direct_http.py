"""The hot path's HTTP (`providers/direct_http.py`): chat, streamed chat and embeddings sent on one
pooled aiohttp session per provider instead of through the official SDKs' request machinery.

Drift tests: for the same domain request, the provider's own SDK client sends it (with the body the
adapter's wire mapping builds) and the adapter's direct path sends it, to the same loopback
emulator; the two recorded requests must match in method, target, JSON body and headers (every
header either sends, except the documented allowlist below). Behaviour tests: error bodies, size
limits, over-long stream events and CRLF framing, connection reuse and release, proxies and custom CAs, against the
emulators or small aiohttp / asyncio servers started here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import trustme
from aiohttp import web

from llm_gateway_server.config import ProviderSettings
from llm_gateway_server.domain import (
    ChatDelta,
    ChatRequest,
    GenerationOptions,
    Message,
    ProviderStreamEnd,
    ProviderStreamEvent,
    Role,
    TextPart,
    Tool,
)
from llm_gateway_server.errors import GatewayError, Reason
from llm_gateway_server.providers import anthropic_mapping, direct_http, openai_mapping, registry
from llm_gateway_server.providers.anthropic_adapter import AnthropicProvider
from llm_gateway_server.providers.base import ProviderConfig
from llm_gateway_server.providers.openai_adapter import OpenAIProvider

from .conftest import OPENAI_TEST_KEY
from .emulators.anthropic_server import AnthropicEmulator
from .emulators.base import LoopbackEmulator
from .emulators.groq_server import GroqEmulator
from .emulators.openai_server import OpenAIEmulator

E = TypeVar("E", bound=LoopbackEmulator)
# The adapters on a Stainless SDK (Groq's is an OpenAIProvider).
SdkAdapter = OpenAIProvider | AnthropicProvider
TIMEOUT_S = 10.0
ANTHROPIC_KEY = "sk-ant-drift-0123456789"
GROQ_KEY = "gsk_drift_0123456789"

# Headers the direct path may send differently from the SDK, and why:
# - transport only: `content-length` (the SDK serialises JSON without spaces, `json.dumps` with
#   them; the bodies are compared parsed), `connection` (the SDKs' aiohttp transport sends
#   `keep-alive` explicitly; it is HTTP/1.1's default, and the reuse test below shows the direct
#   path keeps its connections alive);
# - the SDK's per-call telemetry of the call's timeout, whose value is the call's deadline.
TRANSPORT_ONLY = frozenset({"content-length", "connection"})
PER_CALL_TELEMETRY = frozenset({"x-stainless-timeout", "x-stainless-read-timeout"})


# --- recording: every request's target (path and query) and client port -----------------------


@dataclass
class WireRecording(LoopbackEmulator):
    """Mixin for an emulator: besides `requests`, records each request's target (`path_qs`) and
    the client's TCP port, index for index."""

    targets: list[str] = field(default_factory=list)
    peer_ports: list[int] = field(default_factory=list)

    async def _record(self, request: web.Request) -> Any:
        body = await super()._record(request)
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        self.targets.append(request.path_qs)
        self.peer_ports.append(int(peer[1]) if peer else -1)
        return body


@dataclass
class OpenAIWire(WireRecording, OpenAIEmulator):
    """The OpenAI emulator, recording targets and client ports."""


@dataclass
class GroqWire(WireRecording, GroqEmulator):
    """The Groq emulator, recording targets and client ports."""


@dataclass
class AnthropicWire(WireRecording, AnthropicEmulator):
    """The Anthropic emulator, recording targets and client ports."""


@dataclass(frozen=True)
class Sent:
    """One recorded request, header names lower-cased."""

    method: str
    target: str
    headers: dict[str, str]
    body: Any


def sent(emulator: WireRecording, index: int) -> Sent:
    recorded = emulator.requests[index]
    headers = {name.lower(): value for name, value in recorded.headers.items()}
    return Sent(recorded.method, emulator.targets[index], headers, recorded.body)


@contextlib.asynccontextmanager
async def running(emulator: E) -> AsyncIterator[E]:
    """Starts `emulator` for the block."""
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.stop()


@contextlib.asynccontextmanager
async def built(settings: list[ProviderSettings], environ: dict[str, str]) -> AsyncIterator[SdkAdapter]:
    """The one adapter `build_registry` makes of `settings` (closed after the block)."""
    providers = registry.build_registry(settings, environ)
    try:
        provider = providers.get(providers.names()[0])
        assert isinstance(provider, (OpenAIProvider, AnthropicProvider))
        yield provider
    finally:
        await providers.aclose()


@contextlib.asynccontextmanager
async def openai_at(base_url: str) -> AsyncIterator[OpenAIProvider]:
    """An OpenAI-compatible adapter (no key) on `base_url` (closed after the block)."""
    provider = OpenAIProvider(ProviderConfig(name="upstream", base_url=base_url))
    try:
        yield provider
    finally:
        await provider.aclose()


def domain_request(model: str) -> ChatRequest:
    """A request with a system prompt, a tool, sampling options, stop sequences and a user id."""
    return ChatRequest(
        model=model,
        messages=(
            Message(Role.SYSTEM, (TextPart("Be brief."),)),
            Message(Role.USER, (TextPart("Hi there"),)),
        ),
        tools=(
            Tool(
                name="get_weather",
                description="Weather of a city",
                parameters={"type": "object", "properties": {"city": {"type": "string"}}},
            ),
        ),
        generation=GenerationOptions(temperature=0.25, max_output_tokens=32, stop_sequences=("END",)),
        end_user_id="user-7",
    )


async def drain(events: AsyncIterator[ProviderStreamEvent]) -> list[ProviderStreamEvent]:
    return [event async for event in events]


async def sdk_stream(stream: Awaitable[Any]) -> None:
    """Reads an SDK stream to its end."""
    async for _ in await stream:
        pass


async def sdk_and_direct(
    emulator: WireRecording, via_sdk: Callable[[], Awaitable[Any]], via_direct: Callable[[], Awaitable[Any]]
) -> tuple[Sent, Sent]:
    """Runs the SDK's call, then the direct path's; returns the two requests the emulator saw."""
    first = len(emulator.requests)
    await via_sdk()
    await via_direct()
    assert len(emulator.requests) == first + 2
    return sent(emulator, first), sent(emulator, first + 1)


def assert_no_drift(sdk: Sent, direct: Sent) -> dict[str, str]:
    """Same method, target, parsed body and headers (but the allowlist); returns the compared
    headers."""
    assert (direct.method, direct.target) == (sdk.method, sdk.target)
    assert direct.body == sdk.body
    # The allowlist is what the SDK really sends per call (not a mask over nothing).
    assert "x-stainless-read-timeout" in sdk.headers
    ignored = TRANSPORT_ONLY | PER_CALL_TELEMETRY
    sdk_headers = {k: v for k, v in sdk.headers.items() if k not in ignored}
    direct_headers = {k: v for k, v in direct.headers.items() if k not in ignored}
    differing = {k: (v, direct_headers.get(k)) for k, v in sdk_headers.items() if direct_headers.get(k) != v}
    assert not differing, f"SDK header → (SDK value, direct value): {differing}"
    assert set(direct_headers) == set(sdk_headers), (
        f"sent only by the direct path: {set(direct_headers) - set(sdk_headers)}"
    )
    for name in ("authorization", "x-api-key", "user-agent"):
        assert direct.headers.get(name) == sdk.headers.get(name)
    return sdk_headers


# --- 1. drift: the SDK's request and the direct path's, provider kind by kind -----------------


async def test_openai_requests_match_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI configured by its standard variables (key and base URL), with an organisation and a
    project the SDK reads from the process environment: unary chat, streamed chat and embeddings
    leave the direct path exactly as the openai SDK sends them (key, user agent, platform
    headers, organisation and project included)."""
    monkeypatch.setenv("OPENAI_ORG_ID", "org-drift")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-drift")
    async with running(OpenAIWire()) as emulator:
        environ = {"OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": emulator.base_url}
        async with built(registry.environment_providers(environ), environ) as provider:
            assert provider.name == "openai"
            client = provider._client
            request = domain_request("gpt-4o-mini")
            unary = openai_mapping.chat_params(request, "gpt-4o-mini", stream=False)
            streamed = openai_mapping.chat_params(request, "gpt-4o-mini", stream=True)
            assert streamed["stream"] is True and "stream" not in unary

            sdk, direct = await sdk_and_direct(
                emulator,
                lambda: client.chat.completions.create(**unary, timeout=TIMEOUT_S),
                lambda: provider.chat(request, "gpt-4o-mini", TIMEOUT_S),
            )
            headers = assert_no_drift(sdk, direct)
            assert sdk.target == "/v1/chat/completions"
            assert headers["authorization"] == f"Bearer {OPENAI_TEST_KEY}"
            assert (headers["openai-organization"], headers["openai-project"]) == ("org-drift", "proj-drift")
            assert headers["user-agent"].startswith("AsyncOpenAI/Python")

            sdk, direct = await sdk_and_direct(
                emulator,
                lambda: sdk_stream(client.chat.completions.create(**streamed, timeout=TIMEOUT_S)),
                lambda: drain(provider.chat_stream(request, "gpt-4o-mini", TIMEOUT_S)),
            )
            assert_no_drift(sdk, direct)
            assert direct.body["stream"] is True and direct.body["stream_options"] == {"include_usage": True}

            inputs = ("one", "two")
            sdk, direct = await sdk_and_direct(
                emulator,
                lambda: client.embeddings.create(
                    model="text-embedding-3-small",
                    input=list(inputs),
                    encoding_format="float",
                    dimensions=8,
                    timeout=TIMEOUT_S,
                ),
                lambda: provider.embed("text-embedding-3-small", inputs, 8, TIMEOUT_S),
            )
            assert_no_drift(sdk, direct)
            assert sdk.target == "/v1/embeddings" and direct.body["encoding_format"] == "float"


async def test_keyless_openai_compatible_requests_match_the_sdk() -> None:
    """A named OpenAI-compatible server configured without a key: both paths send the SDK's
    placeholder bearer key (and the rest of the SDK's headers) for chat, stream and embeddings."""
    async with running(OpenAIWire()) as emulator:
        settings = [ProviderSettings(name="vllm", kind="openai", base_url=emulator.base_url)]
        async with built(settings, {}) as provider:
            client = provider._client
            request = domain_request("served-model")
            unary = openai_mapping.chat_params(request, "served-model", stream=False)
            streamed = openai_mapping.chat_params(request, "served-model", stream=True)

            sdk, direct = await sdk_and_direct(
                emulator,
                lambda: client.chat.completions.create(**unary, timeout=TIMEOUT_S),
                lambda: provider.chat(request, "served-model", TIMEOUT_S),
            )
            headers = assert_no_drift(sdk, direct)
            assert headers["authorization"] == "Bearer no-key-configured"

            sdk, direct = await sdk_and_direct(
                emulator,
                lambda: sdk_stream(client.chat.completions.create(**streamed, timeout=TIMEOUT_S)),
                lambda: drain(provider.chat_stream(request, "served-model", TIMEOUT_S)),
            )
            assert_no_drift(sdk, direct)

            sdk, direct = await sdk_and_direct(
                emulator,
                lambda: client.embeddings.create(
                    model="served-embedder", input=["x"], encoding_format="float", timeout=TIMEOUT_S
                ),
                lambda: provider.embed("served-embedder", ("x",), None, TIMEOUT_S),
            )
            assert_no_drift(sdk, direct)
            assert "dimensions" not in direct.body


async def test_groq_requests_match_the_sdk() -> None:
    """Groq by its standard variables: chat and streamed chat (the adapter's `_chat_params`, i.e.
    without `stream_options`) leave the direct path as the groq SDK sends them, under
    `/openai/v1/`."""
    async with running(GroqWire()) as emulator:
        environ = {"GROQ_API_KEY": GROQ_KEY, "GROQ_BASE_URL": emulator.base_url}
        async with built(registry.environment_providers(environ), environ) as provider:
            assert provider.name == "groq" and isinstance(provider, OpenAIProvider)
            client = provider._client
            request = domain_request("llama-3.1-8b-instant")
            unary = provider._chat_params(request, "llama-3.1-8b-instant", stream=False)
            streamed = provider._chat_params(request, "llama-3.1-8b-instant", stream=True)
            assert streamed["stream"] is True and "stream_options" not in streamed

            sdk, direct = await sdk_and_direct(
                emulator,
                lambda: client.chat.completions.create(**unary, timeout=TIMEOUT_S),
                lambda: provider.chat(request, "llama-3.1-8b-instant", TIMEOUT_S),
            )
            headers = assert_no_drift(sdk, direct)
            assert sdk.target == "/openai/v1/chat/completions"
            assert headers["authorization"] == f"Bearer {GROQ_KEY}"
            assert headers["user-agent"].startswith("AsyncGroq/Python")

            sdk, direct = await sdk_and_direct(
                emulator,
                lambda: sdk_stream(client.chat.completions.create(**streamed, timeout=TIMEOUT_S)),
                lambda: drain(provider.chat_stream(request, "llama-3.1-8b-instant", TIMEOUT_S)),
            )
            assert_no_drift(sdk, direct)


async def test_anthropic_requests_match_the_sdk() -> None:
    """Anthropic by its standard variables: chat and streamed chat leave the direct path as the
    anthropic SDK sends them, with the same credentials header and `anthropic-version`."""
    async with running(AnthropicWire()) as emulator:
        environ = {"ANTHROPIC_API_KEY": ANTHROPIC_KEY, "ANTHROPIC_BASE_URL": emulator.base_url}
        async with built(registry.environment_providers(environ), environ) as provider:
            assert provider.name == "anthropic"
            client = provider._client
            request = domain_request("claude-haiku-4-5-20251001")
            params = anthropic_mapping.chat_params(request, "claude-haiku-4-5-20251001")

            sdk, direct = await sdk_and_direct(
                emulator,
                lambda: client.messages.create(**params, timeout=TIMEOUT_S),
                lambda: provider.chat(request, "claude-haiku-4-5-20251001", TIMEOUT_S),
            )
            headers = assert_no_drift(sdk, direct)
            assert sdk.target == "/v1/messages"
            assert direct.headers.get("anthropic-version") == sdk.headers.get("anthropic-version")
            assert headers["anthropic-version"]
            credentials = {k: v for k, v in headers.items() if k in ("authorization", "x-api-key")}
            assert ANTHROPIC_KEY in " ".join(credentials.values())

            sdk, direct = await sdk_and_direct(
                emulator,
                lambda: sdk_stream(client.messages.create(**params, stream=True, timeout=TIMEOUT_S)),
                lambda: drain(provider.chat_stream(request, "claude-haiku-4-5-20251001", TIMEOUT_S)),
            )
            assert_no_drift(sdk, direct)
            assert direct.body["stream"] is True
            assert direct.headers.get("anthropic-version") == sdk.headers.get("anthropic-version")


# --- 2. the direct path's behaviour ---------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """Serves `app` on 127.0.0.1 (a free port, yielded) for the block; handlers are cancelled
    when their client disconnects."""
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


def chat_app(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return app


def completion(text: str, **extra: Any) -> bytes:
    """A Chat Completions answer (JSON bytes), with `extra` top-level fields."""
    body = {
        **extra,
        "id": "chatcmpl-tiny",
        "object": "chat.completion",
        "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }
    return json.dumps(body).encode()


async def answer(
    request: web.Request, status: int, body: bytes, *, chunked: bool, **headers: str
) -> web.StreamResponse:
    """Answers `body` with a content-length, or chunked in 256-byte pieces (no content-length)."""
    if not chunked:
        return web.Response(status=status, body=body, content_type="application/json", headers=headers)
    response = web.StreamResponse(status=status, headers={"Content-Type": "application/json", **headers})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for start in range(0, len(body), 256):
        await response.write(body[start : start + 256])
    await response.write_eof()
    return response


def hi(model: str = "tiny") -> ChatRequest:
    return ChatRequest(model=model, messages=(Message(Role.USER, (TextPart("Hi"),)),))


async def failure(call: Awaitable[Any]) -> GatewayError:
    """Awaits `call` (within 5 s: never a hang), which must raise GatewayError."""
    with pytest.raises(GatewayError) as caught:
        async with asyncio.timeout(5):
            await call
    return caught.value


async def test_rate_limit_status_maps_with_the_providers_message_and_retry_after() -> None:
    """A 429 with a JSON error body and `retry-after: 2` (Anthropic's form) or `retry-after-ms:
    1500` (OpenAI's), unary and streamed: PROVIDER_RATE_LIMITED with the provider's message,
    HTTP status and delay, from the direct path's own error reading."""
    async with running(AnthropicEmulator()) as anthropic_emulator, running(OpenAIEmulator()) as openai_emulator:
        environ = {
            "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
            "ANTHROPIC_BASE_URL": anthropic_emulator.base_url,
            "OPENAI_API_KEY": OPENAI_TEST_KEY,
            "OPENAI_BASE_URL": openai_emulator.base_url,
        }
        providers = registry.build_registry(registry.environment_providers(environ), environ)
        try:
            for name, delay in (("anthropic", 2.0), ("openai", 1.5)):
                provider = providers.get(name)
                assert provider is not None
                for error in (
                    await failure(provider.chat(hi("status-429"), "status-429", TIMEOUT_S)),
                    await failure(drain(provider.chat_stream(hi("status-429"), "status-429", TIMEOUT_S))),
                ):
                    assert error.reason is Reason.PROVIDER_RATE_LIMITED, name
                    assert "emulated failure with status 429" in error.message
                    assert error.metadata["upstream_status"] == "429"
                    assert error.retry_after_s == delay
        finally:
            await providers.aclose()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_response_limit_is_a_bad_response(monkeypatch: pytest.MonkeyPatch, chunked: bool) -> None:
    """With `MAX_RESPONSE_BYTES` at 1 KiB, a 900-byte answer is read and a 2 KiB one is
    PROVIDER_BAD_RESPONSE, whether the body declares its length or comes chunked without one."""
    monkeypatch.setattr(direct_http, "MAX_RESPONSE_BYTES", 1024)
    small = completion("fits", padding="p" * (900 - len(completion("fits", padding=""))))
    large = completion("too big", padding="p" * 2048)
    assert len(small) == 900 and len(large) > 2048
    bodies = {"fits": small, "too-big": large}

    async def handler(request: web.Request) -> web.StreamResponse:
        return await answer(request, 200, bodies[(await request.json())["model"]], chunked=chunked)

    async with serving(chat_app(handler)) as port, openai_at(f"http://127.0.0.1:{port}/v1") as provider:
        result = await provider.chat(hi(), "fits", TIMEOUT_S)
        assert result.text == "fits"
        error = await failure(provider.chat(hi(), "too-big", TIMEOUT_S))
        assert error.reason is Reason.PROVIDER_BAD_RESPONSE
        assert error.metadata["failure"] == "bad_response"
        assert "than the 1024" in error.message
        assert (await provider.chat(hi(), "fits", TIMEOUT_S)).text == "fits"  # the session still works


@pytest.mark.parametrize("framing", ["content-length", "chunked", "endless"])
async def test_an_error_body_over_its_limit_is_truncated_not_fatal(
    monkeypatch: pytest.MonkeyPatch, framing: str
) -> None:
    """With `MAX_ERROR_BODY_BYTES` at 1 KiB, a 429 whose JSON error body is 4 KiB (with a length,
    chunked, or never ending) still maps to PROVIDER_RATE_LIMITED with its retry-after: only its
    first KiB is read (too little to parse, so the raw text is the message), and an endless body
    does not hang the call. A small error body of the same shape is parsed (its message)."""
    monkeypatch.setattr(direct_http, "MAX_ERROR_BODY_BYTES", 1024)
    error_body = {"error": {"message": "slow down please", "type": "requests", "code": "rate_limit"}}
    disconnected = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        pad = int((await request.json())["model"])
        body = json.dumps({"padding": "p" * pad, **error_body}).encode()
        if framing != "endless":
            return await answer(request, 429, body, chunked=framing == "chunked", **{"retry-after": "2"})
        response = web.StreamResponse(status=429, headers={"Content-Type": "application/json", "retry-after": "2"})
        await response.prepare(request)
        try:
            await response.write(body[: len(body) // 2])
            while True:
                await response.write(b"p" * 1024)
                await asyncio.sleep(0.001)
        except (asyncio.CancelledError, ConnectionResetError):
            disconnected.set()
            raise

    async with serving(chat_app(handler)) as port, openai_at(f"http://127.0.0.1:{port}/v1") as provider:
        if framing != "endless":
            small = await failure(provider.chat(hi(), "10", TIMEOUT_S))
            assert small.reason is Reason.PROVIDER_RATE_LIMITED and "slow down please" in small.message
            assert small.metadata["upstream_code"] == "rate_limit"
        error = await failure(provider.chat(hi(), "4096", TIMEOUT_S))
        assert error.reason is Reason.PROVIDER_RATE_LIMITED
        assert error.retry_after_s == 2.0 and error.metadata["upstream_status"] == "429"
        assert '{"padding": "ppp' in error.message and "slow down please" not in error.message
        assert "upstream_code" not in error.metadata
        if framing == "endless":
            async with asyncio.timeout(2):
                await disconnected.wait()  # the connection was closed, not left streaming


def stream_chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
    """One Chat Completions stream chunk (JSON text)."""
    return json.dumps(
        {"id": "c", "model": "tiny", "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    )


@pytest.mark.parametrize("case", ["under-limit", "over-limit-unterminated", "over-limit-terminated"])
async def test_an_sse_event_over_its_limit_is_a_bad_response(case: str) -> None:
    """A stream event a little under `MAX_SSE_EVENT_BYTES` (1 MiB) is read whole. One a KiB over
    it that never ends while the server keeps the connection open is PROVIDER_BAD_RESPONSE at
    once (not a wait for the end of the event) and its connection is closed; one a KiB over the
    limit that does end (a blank line) is PROVIDER_BAD_RESPONSE too (each complete event's size
    is checked as well)."""
    disconnected = asyncio.Event()
    limit = direct_http.MAX_SSE_EVENT_BYTES
    size = {"under-limit": limit - 4096, "over-limit-unterminated": limit + 1024, "over-limit-terminated": limit + 1024}
    text = "t" * size[case]

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = f"data: {stream_chunk({'content': text})}"
        try:
            if case == "over-limit-unterminated":
                await response.write(event.encode())
                await asyncio.sleep(3600)
            await response.write(f"{event}\n\ndata: {stream_chunk({}, 'stop')}\n\ndata: [DONE]\n\n".encode())
            await response.write_eof()
        except asyncio.CancelledError:
            disconnected.set()
            raise
        return response

    async with serving(chat_app(handler)) as port, openai_at(f"http://127.0.0.1:{port}/v1") as provider:
        if case == "under-limit":
            events = await drain(provider.chat_stream(hi(), "tiny", TIMEOUT_S))
            assert isinstance(events[0], ChatDelta) and len(events[0].text) == len(text)
            assert isinstance(events[-1], ProviderStreamEnd)
            return
        error = await failure(drain(provider.chat_stream(hi(), "tiny", TIMEOUT_S)))
        assert error.reason is Reason.PROVIDER_BAD_RESPONSE
        assert f"longer than {limit} bytes" in error.message
        if case == "over-limit-unterminated":
            async with asyncio.timeout(2):
                await disconnected.wait()


async def crlf_stream(first_writes: list[bytes]) -> tuple[list[ProviderStreamEvent], bool]:
    """Streams a CRLF-framed answer whose first event is written in `first_writes` (separate
    network writes 20 ms apart); the rest is sent only once the client has the first delta, or
    after 1 s. Returns the events and whether the first delta arrived before the rest was sent."""
    got_first = asyncio.Event()
    before_rest: list[bool] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in first_writes:
            await response.write(piece)
            await asyncio.sleep(0.02)
        try:
            async with asyncio.timeout(1):
                await got_first.wait()
            before_rest.append(True)
        except TimeoutError:
            before_rest.append(False)
        await response.write(f"data: {stream_chunk({}, 'stop')}\r\n\r\ndata: [DONE]\r\n\r\n".encode())
        await response.write_eof()
        return response

    events: list[ProviderStreamEvent] = []
    async with serving(chat_app(handler)) as port, openai_at(f"http://127.0.0.1:{port}/v1") as provider:
        async for event in provider.chat_stream(hi(), "tiny", TIMEOUT_S):
            events.append(event)
            if isinstance(event, ChatDelta):
                got_first.set()
    return events, before_rest == [True]


async def test_crlf_framed_events_are_read_as_they_arrive() -> None:
    """Events framed with CRLF line ends (the SSE format allows them), the first one's text and
    its terminator in separate network writes: the first delta is delivered as soon as its event
    is complete, and the stream ends normally."""
    event = f"data: {stream_chunk({'content': 'one'})}".encode()
    events, in_time = await crlf_stream([event, b"\r\n\r\n"])
    assert isinstance(events[0], ChatDelta) and events[0].text == "one"
    assert isinstance(events[-1], ProviderStreamEnd) and in_time


async def test_a_crlf_terminator_split_between_cr_and_lf_is_not_held_back() -> None:
    """The same, with the first event's CRLF CRLF terminator split between its last CR and LF
    across two network writes: the event is complete when the LF arrives and must be delivered
    then, not when the next chunk (here 1 s later) arrives."""
    event = f"data: {stream_chunk({'content': 'one'})}".encode()
    events, in_time = await crlf_stream([event + b"\r\n\r", b"\n"])
    assert isinstance(events[0], ChatDelta) and events[0].text == "one"
    assert in_time, "the first delta arrived only after the server sent the next chunk"


async def test_sequential_streams_and_calls_reuse_one_connection() -> None:
    """Five streams read to their end, five unary chats and two embeddings calls, one after the
    other, all arrive on one TCP connection (one client port seen by the server)."""
    async with running(OpenAIWire()) as emulator, openai_at(emulator.base_url) as provider:
        for _ in range(5):
            events = await drain(provider.chat_stream(hi(), "gpt-4o-mini", TIMEOUT_S))
            assert isinstance(events[-1], ProviderStreamEnd)
        for _ in range(5):
            assert (await provider.chat(hi(), "gpt-4o-mini", TIMEOUT_S)).text == "echo: Hi"
        for _ in range(2):
            await provider.embed("text-embedding-3-small", ("a", "b"), None, TIMEOUT_S)
        assert len(emulator.peer_ports) == 12
        assert len(set(emulator.peer_ports)) == 1, emulator.peer_ports


async def test_a_consumer_leaving_a_stream_early_closes_its_connection() -> None:
    """A consumer that closes the stream after its first delta (the upstream still streaming):
    the connection is closed at once (the server's handler sees the disconnect), it is not put
    back in the pool (the next call comes from another client port), and the next call works."""
    async with running(OpenAIWire()) as emulator, openai_at(emulator.base_url) as provider:
        stream = provider.chat_stream(hi(), "stall-stream", TIMEOUT_S)
        assert isinstance(stream, AsyncGenerator)
        first = await anext(stream)
        assert isinstance(first, ChatDelta) and first.text
        await stream.aclose()
        for _ in range(400):  # ≤ 2 s
            if emulator.disconnects:
                break
            await asyncio.sleep(0.005)
        assert emulator.disconnects == ["stream"]
        assert (await provider.chat(hi(), "gpt-4o-mini", TIMEOUT_S)).text == "echo: Hi"
        assert len(emulator.peer_ports) == 2 and emulator.peer_ports[0] != emulator.peer_ports[1]


HOP_BY_HOP = frozenset({"host", "content-length", "connection", "proxy-connection", "keep-alive", "transfer-encoding"})


@dataclass
class ForwardProxy:
    """A plain-HTTP forward proxy: records each request's target as received (absolute-form from
    a proxy client) and forwards it with its own session (which ignores the environment)."""

    targets: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        return app

    async def _forward(self, request: web.Request) -> web.Response:
        self.targets.append(request.raw_path)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        forwarded = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with (
            aiohttp.ClientSession(trust_env=False) as session,
            session.request(request.method, request.raw_path, headers=forwarded, data=await request.read()) as up,
        ):
            body = await up.read()
            return web.Response(status=up.status, body=body, headers={"Content-Type": up.headers["Content-Type"]})


def clear_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


async def test_http_proxy_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `HTTP_PROXY` set before the session is made, a chat and a stream to a plain-HTTP
    provider go through the proxy (absolute-form targets, the provider's key forwarded) and
    answer normally."""
    clear_proxy_environment(monkeypatch)
    proxy = ForwardProxy()
    async with running(OpenAIEmulator()) as emulator, serving(proxy.app()) as proxy_port:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy_port}")
        async with openai_at(emulator.base_url) as provider:
            assert (await provider.chat(hi(), "gpt-4o-mini", TIMEOUT_S)).text == "echo: Hi"
            events = await drain(provider.chat_stream(hi(), "gpt-4o-mini", TIMEOUT_S))
            assert "".join(e.text for e in events if isinstance(e, ChatDelta)) == "echo: Hi"
        assert proxy.targets == [f"{emulator.base_url}/chat/completions"] * 2
        assert proxy.headers[0]["authorization"] == "Bearer no-key-configured"
        assert len(emulator.calls("/chat/completions")) == 2


@dataclass
class ConnectProxy:
    """An HTTPS (CONNECT) proxy: records each CONNECT target, then tunnels bytes both ways."""

    targets: list[str] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            self.targets.append(f"{method} {target}")
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            self._writers.add(up_writer)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()


@dataclass(frozen=True)
class TlsUpstream:
    """An OpenAI emulator over HTTPS with a certificate for 127.0.0.1 from a fresh CA."""

    emulator: OpenAIEmulator
    port: int
    ca_file: Path

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/v1"


@pytest.fixture
def fresh_ssl_context() -> Iterator[None]:
    """The process's shared TLS context is rebuilt from this test's environment, and again after
    it (for the tests that follow)."""
    direct_http.shared_ssl_context.cache_clear()
    yield
    direct_http.shared_ssl_context.cache_clear()


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[TlsUpstream]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    emulator = OpenAIEmulator()
    app = web.Application()
    emulator._routes(app)
    async with serving(app, server_context) as port:
        yield TlsUpstream(emulator, port, ca_file)


async def test_a_custom_ca_from_ssl_cert_file_is_trusted(
    monkeypatch: pytest.MonkeyPatch, fresh_ssl_context: None, tls_upstream: TlsUpstream
) -> None:
    """An HTTPS provider whose certificate comes from a private CA: with `SSL_CERT_FILE` naming
    that CA a chat succeeds."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_upstream.ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with openai_at(tls_upstream.base_url) as provider:
        assert (await provider.chat(hi(), "gpt-4o-mini", TIMEOUT_S)).text == "echo: Hi"
    assert len(tls_upstream.emulator.calls("/chat/completions")) == 1


async def test_without_the_custom_ca_the_certificate_is_refused(
    monkeypatch: pytest.MonkeyPatch, fresh_ssl_context: None, tls_upstream: TlsUpstream
) -> None:
    """The same HTTPS provider without `SSL_CERT_FILE` / `SSL_CERT_DIR` (certifi's bundle only):
    the chat fails with PROVIDER_UNAVAILABLE, a connection failure naming the certificate, and no
    request reaches the server."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with openai_at(tls_upstream.base_url) as provider:
        error = await failure(provider.chat(hi(), "gpt-4o-mini", TIMEOUT_S))
    assert error.reason is Reason.PROVIDER_UNAVAILABLE and error.metadata["failure"] == "connection"
    assert "CERTIFICATE_VERIFY_FAILED" in error.message
    assert tls_upstream.emulator.requests == []


async def test_https_proxy_from_the_environment_tunnels_to_the_provider(
    monkeypatch: pytest.MonkeyPatch, fresh_ssl_context: None, tls_upstream: TlsUpstream
) -> None:
    """With `HTTPS_PROXY` set, an HTTPS provider is reached through a CONNECT tunnel of the proxy
    (TLS verified end to end against `SSL_CERT_FILE`); chat and stream answer normally."""
    clear_proxy_environment(monkeypatch)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_upstream.ca_file))
    proxy = ConnectProxy()
    await proxy.start()
    try:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
        async with openai_at(tls_upstream.base_url) as provider:
            assert (await provider.chat(hi(), "gpt-4o-mini", TIMEOUT_S)).text == "echo: Hi"
            events = await drain(provider.chat_stream(hi(), "gpt-4o-mini", TIMEOUT_S))
            assert isinstance(events[-1], ProviderStreamEnd)
    finally:
        await proxy.stop()
    assert proxy.targets and set(proxy.targets) == {f"CONNECT 127.0.0.1:{tls_upstream.port}"}
    assert len(tls_upstream.emulator.calls("/chat/completions")) == 2
