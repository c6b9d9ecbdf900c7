"""Ollama on the official `ollama` SDK (native `/api/*` endpoints, NDJSON streams).

One `ollama.AsyncClient` per configured provider, reused. The SDK never retries and has no
per-call timeout, so each call runs under `asyncio.timeout(timeout_s)`; cancelling the task (client
cancel, deadline) closes the upstream HTTP request.

The SDK's `ResponseError` keeps only the status and body of a failed response, not its
`retry-after` / `retry-after-ms` headers; an httpx response hook on the SDK's client records them
(see `_record_error_response`) for `_map`.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import httpx
import ollama
import pydantic

from ..domain import (
    ChatDelta,
    ChatRequest,
    LiveModel,
    OptionWarning,
    ProviderChatResult,
    ProviderEmbedResult,
    ProviderStreamEnd,
    ProviderStreamEvent,
    ToolCallDelta,
    Usage,
)
from ..errors import GatewayError
from . import errors, ollama_mapping
from .base import Provider, ProviderConfig, ProviderSpec
from .direct_http import shared_ssl_context

T = TypeVar("T")

# Inputs per /api/embed call: Ollama documents no limit; batches bound request size and latency.
EMBED_BATCH_LIMIT = 256

_RETRY_HEADERS = ("retry-after-ms", "retry-after")
# (status, retry headers) of the last error response an Ollama call received in this task.
_last_error_response: contextvars.ContextVar[tuple[int, dict[str, str]] | None] = contextvars.ContextVar(
    "ollama_last_error_response", default=None
)


async def _record_error_response(response: httpx.Response) -> None:
    """httpx response hook: notes an error response's status and retry headers.

    httpx awaits response hooks inside `AsyncClient.send`, in the task making the request, before
    the SDK turns the status into a `ResponseError` in that same task; so the value set here is
    seen by that call's `_map` and by no other task (each task runs in its own context). Every
    error response overwrites it, so a call never reads an earlier call's headers.
    """
    if response.is_error:
        headers = {k: response.headers[k] for k in _RETRY_HEADERS if k in response.headers}
        _last_error_response.set((response.status_code, headers))


class OllamaProvider(Provider):
    """Adapter for an Ollama server.

    Built from a `ProviderConfig` whose `base_url` is the server root, e.g.
    "http://127.0.0.1:11434" (no `/api`), parsed like `OLLAMA_HOST`; no key.
    """

    kind = "ollama"

    def _make_client(self, config: ProviderConfig) -> ollama.AsyncClient:
        limits = httpx.Limits(max_connections=config.max_connections, max_keepalive_connections=config.max_connections)
        return ollama.AsyncClient(  # kwargs other than host go to httpx.AsyncClient
            host=config.base_url,
            limits=limits,
            event_hooks={"response": [_record_error_response]},
            verify=shared_ssl_context(),  # httpx would load the CA bundle again (~15 ms) per client
        )

    def chat_warnings(self, request: ChatRequest) -> tuple[OptionWarning, ...]:
        """Warnings for dropped options (image URLs, which Ollama cannot fetch, fail the call)."""
        return ollama_mapping.chat_warnings(request)

    async def chat(self, request: ChatRequest, model: str, timeout_s: float) -> ProviderChatResult:
        """Non-streamed chat; see `Provider.chat`."""
        params = ollama_mapping.chat_params(request, model, self.name)
        response = await self._bounded(model, timeout_s, self._client.chat(**params, stream=False))
        calls = ollama_mapping.tool_calls_from_wire(response.message.tool_calls)
        return ProviderChatResult(
            model=response.model or model,
            text=response.message.content or "",
            tool_calls=calls,
            finish_reason=ollama_mapping.finish_reason(response.done_reason, bool(calls)),
            provider_finish_reason=response.done_reason or "stop",
            usage=ollama_mapping.usage_from_wire(response),
        )

    async def chat_stream(
        self, request: ChatRequest, model: str, timeout_s: float
    ) -> AsyncIterator[ProviderStreamEvent]:
        """Streamed chat over NDJSON; see `Provider.chat_stream`."""
        params = ollama_mapping.chat_params(request, model, self.name)
        # Bounded here until the response starts; the router bounds every later chunk (a timeout
        # context must not span a `yield`: it would cancel the consumer instead).
        stream = await self._bounded(model, timeout_s, self._client.chat(**params, stream=True))
        calls_seen = 0
        try:
            async for part in stream:
                calls = ollama_mapping.tool_calls_from_wire(part.message.tool_calls)
                fragments = tuple(
                    ToolCallDelta(index=calls_seen + i, id=c.id, name=c.name, arguments=c.arguments)
                    for i, c in enumerate(calls)
                )
                calls_seen += len(calls)
                if part.message.content or fragments:
                    yield ChatDelta(text=part.message.content or "", tool_calls=fragments)
                if part.done:
                    yield ProviderStreamEnd(
                        model=part.model or model,
                        finish_reason=ollama_mapping.finish_reason(part.done_reason, calls_seen > 0),
                        provider_finish_reason=part.done_reason or "stop",
                        usage=ollama_mapping.usage_from_wire(part),
                    )
                    return
        except GatewayError:
            raise
        except Exception as exc:
            raise self._map(exc, model) from exc
        finally:
            await stream.aclose()
        raise errors.bad_response(self.name, model, "the stream ended before its final (done) line")

    async def embed(
        self, model: str, inputs: tuple[str, ...], dimensions: int | None, timeout_s: float
    ) -> ProviderEmbedResult:
        """`/api/embed` in batches of `EMBED_BATCH_LIMIT`; see `Provider.embed`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        vectors: list[tuple[float, ...]] = []
        input_tokens = 0
        answered_model = model
        for start in range(0, len(inputs), EMBED_BATCH_LIMIT):
            batch = list(inputs[start : start + EMBED_BATCH_LIMIT])
            remaining = max(deadline - loop.time(), 0.001)
            result = await self._bounded(
                model, remaining, self._client.embed(model=model, input=batch, dimensions=dimensions)
            )
            if len(result.embeddings) != len(batch):
                raise errors.bad_response(self.name, model, f"{len(result.embeddings)} vectors for {len(batch)} inputs")
            vectors.extend(tuple(float(x) for x in v) for v in result.embeddings)
            input_tokens += int(result.prompt_eval_count or 0)
            answered_model = result.model or answered_model
        return ProviderEmbedResult(model=answered_model, vectors=tuple(vectors), usage=Usage(input_tokens=input_tokens))

    async def list_models(self, timeout_s: float) -> tuple[LiveModel, ...]:
        """Models from `GET /api/tags`, each described by `POST /api/show` (capabilities, context
        length); a model whose `show` fails is listed without details."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        listing = await self._bounded("", timeout_s, self._client.list())
        names = [m.model for m in listing.models if m.model]

        async def describe(name: str) -> LiveModel:
            try:
                shown = await self._bounded(name, max(deadline - loop.time(), 0.001), self._client.show(name))
            except GatewayError:
                return LiveModel(name)
            return ollama_mapping.live_model(name, shown)

        return tuple(await asyncio.gather(*(describe(n) for n in names)))

    async def aclose(self) -> None:
        """Closes the client's connection pool."""
        await self._client._client.aclose()

    async def _bounded(self, model: str, timeout_s: float, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(timeout_s):
                return await call
        except TimeoutError as exc:
            raise errors.upstream_timeout(self.name, model, timeout_s) from exc
        except Exception as exc:
            raise self._map(exc, model) from exc

    def _map(self, exc: Exception, model: str) -> GatewayError:
        """The Ollama error table: SDK exception → GatewayError (rows in `providers.errors`)."""
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, ollama.ResponseError):
            # status -1: an {"error": ...} line inside a 200 stream.
            return errors.from_http_status(
                self.name, model, exc.status_code, str(exc.error), retry_after_s=_retry_after(exc.status_code)
            )
        if isinstance(exc, ConnectionError):  # the SDK's "Failed to connect to Ollama"
            return errors.connection_failed(self.name, model, str(exc))
        if isinstance(exc, httpx.TransportError):
            return errors.connection_failed(self.name, model, repr(exc))
        if isinstance(exc, (json.JSONDecodeError, pydantic.ValidationError, ValueError, TypeError, KeyError)):
            return errors.bad_response(self.name, model, f"{type(exc).__name__}: {str(exc)[:200]}")
        return errors.bad_response(self.name, model, f"unexpected {type(exc).__name__}")


def _retry_after(status: int) -> float | None:
    """The delay asked for by the error response behind a `ResponseError` with `status` (recorded
    by `_record_error_response` in this task), or None."""
    recorded = _last_error_response.get()
    if status <= 0 or recorded is None or recorded[0] != status:
        return None
    _last_error_response.set(None)
    return errors.parse_retry_after(recorded[1])


SPEC = ProviderSpec(
    kind="ollama",
    factory=OllamaProvider,
    configure_hint="set OLLAMA_HOST, e.g. http://127.0.0.1:11434",
    base_url_env="OLLAMA_HOST",
    key="unused",
)
"""A local or remote Ollama server at `OLLAMA_HOST`."""
