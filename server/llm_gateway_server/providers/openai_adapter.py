"""OpenAI and OpenAI-compatible servers (vLLM, llama.cpp, LM Studio, Together, …) on the official
`openai` SDK (3.x; httpx2 interface over an aiohttp transport by default, see `sdk_http`).

One `AsyncOpenAI` client per configured provider, created at start-up and reused (connection
pooling), with `max_retries=0`: the gateway owns retries. Each call passes `timeout=` from the
caller's remaining deadline; cancelling the awaiting task closes the upstream HTTP request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import httpx2
import openai

from ..domain import (
    ChatRequest,
    LiveModel,
    OptionWarning,
    ProviderChatResult,
    ProviderEmbedResult,
    ProviderStreamEnd,
    ProviderStreamEvent,
    Usage,
)
from ..errors import GatewayError
from . import errors, openai_mapping
from .base import Provider, ProviderConfig, ProviderSpec
from .sdk_http import sdk_http_client
from .stainless_errors import SdkCalls

T = TypeVar("T")

# Placeholder key for OpenAI-compatible servers that need none (the SDK refuses an empty key).
NO_KEY_PLACEHOLDER = "no-key-configured"
# Inputs per embeddings call. Source: OpenAI API reference, embeddings (max 2048 inputs per call).
EMBED_BATCH_LIMIT = 2048


# After `[DONE]`, how long the rest of the body may take to arrive (reading it to its end keeps the
# HTTP/1.1 connection in the pool; a server that never ends the body only costs this wait).
DRAIN_AFTER_DONE_S = 0.25


async def _drain(lines: AsyncIterator[str]) -> None:
    try:
        async with asyncio.timeout(DRAIN_AFTER_DONE_S):
            async for _ in lines:
                pass
    except TimeoutError:
        pass


class OpenAIProvider(SdkCalls, Provider):
    """Adapter for the OpenAI API and any server that speaks its Chat Completions protocol.

    Built from a `ProviderConfig` whose `base_url` is the API root including `/v1` (None: the
    SDK default, api.openai.com); a server that needs no key gets a placeholder (the SDK refuses
    an empty one).
    """

    kind = "openai"
    # The SDK module whose exception classes `_map` checks (the groq SDK mirrors openai's).
    _sdk: ModuleType = openai
    _wire: ClassVar[ModuleType] = openai_mapping
    # Chat Completions path under the client's base URL, and the SDK's raw HTTP response class.
    _chat_path: ClassVar[str] = "/chat/completions"
    _embeddings_path: ClassVar[str] = "/embeddings"
    _response_type: ClassVar[type] = httpx2.Response

    def _make_client(self, config: ProviderConfig) -> Any:
        return openai.AsyncOpenAI(
            api_key=config.api_key or NO_KEY_PLACEHOLDER,
            base_url=config.base_url,
            max_retries=0,
            http_client=sdk_http_client(openai, httpx2.Limits, config.http_client, config.max_connections),
        )

    def _chat_params(self, request: ChatRequest, model: str, *, stream: bool) -> dict[str, Any]:
        return openai_mapping.chat_params(request, model, stream=stream)

    def _chunk_usage(self, chunk: dict[str, Any]) -> Usage | None:
        """Usage carried by a stream chunk (JSON; the `include_usage` chunk), or None."""
        return openai_mapping.usage_from_wire(chunk.get("usage"))

    def chat_warnings(self, request: ChatRequest) -> tuple[OptionWarning, ...]:
        """Warnings for the options this API drops (see `openai_mapping.chat_warnings`)."""
        return openai_mapping.chat_warnings(request)

    async def chat(self, request: ChatRequest, model: str, timeout_s: float) -> ProviderChatResult:
        """Non-streamed chat; see `Provider.chat`. The hot path uses the SDK client's documented
        low-level `post` (base URL, auth, headers, error statuses, timeout all from the SDK) with the
        gateway's already-typed body, and reads the answer as JSON: this skips the SDK's per-call
        parameter transformation and response-model construction (bench/NOTES.md)."""
        params = self._chat_params(request, model, stream=False)
        raw = await self._call(
            model,
            timeout_s,
            lambda: self._client.post(
                self._chat_path, body=params, cast_to=self._response_type, options={"timeout": timeout_s}
            ),
        )
        try:
            return openai_mapping.completion_from_wire(json.loads(raw.content), model)
        except (ValueError, AttributeError, TypeError) as exc:
            raise errors.bad_response(self.name, model, str(exc)) from exc

    async def chat_stream(
        self, request: ChatRequest, model: str, timeout_s: float
    ) -> AsyncIterator[ProviderStreamEvent]:
        """Streamed chat over SSE (`data: <json>` lines ending with `data: [DONE]`, reference §1.4);
        see `Provider.chat_stream`. The SDK sends the request and raises for error statuses; the
        events are parsed here as JSON (an `error` object inside the stream is an upstream error)."""
        params = self._chat_params(request, model, stream=True)
        # The documented low-level `post` with `stream=True` and the raw response type returns the
        # unread HTTP response (error statuses already raised by the SDK); no per-call parameter
        # transformation (bench/NOTES.md).
        response = await self._call(
            model,
            timeout_s,
            lambda: self._client.post(
                self._chat_path,
                body=params,
                cast_to=self._response_type,
                options={"timeout": timeout_s},
                stream=True,
                stream_cls=self._sdk.AsyncStream,
            ),
        )
        raw_reason: str | None = None
        usage: Usage | None = None
        response_id = ""
        answered_model = model
        lines = response.aiter_lines()
        try:
            async for line in lines:
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data.startswith("[DONE]"):
                    await _drain(lines)
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise errors.bad_response(self.name, model, "a stream event is not a JSON object")
                if chunk.get("error"):
                    message, code = openai_mapping.error_fields(chunk)
                    raise errors.from_http_status(self.name, model, -1, message, upstream_code=code)
                response_id = chunk.get("id") or response_id
                answered_model = chunk.get("model") or answered_model
                usage = self._chunk_usage(chunk) or usage
                choices = chunk.get("choices")
                if choices:
                    choice = choices[0]
                    delta = openai_mapping.delta_from_chunk(choice)
                    if delta is not None:
                        yield delta
                    if choice.get("finish_reason"):
                        raw_reason = choice["finish_reason"]
        except GatewayError:
            raise
        except Exception as exc:  # the SDK's own and the HTTP client's errors, mapped in one place
            raise self._map(exc, model, timeout_s) from exc
        finally:
            await response.aclose()
        if raw_reason is None:
            raise errors.bad_response(self.name, model, "the stream ended before a finish reason")
        yield ProviderStreamEnd(
            model=answered_model,
            finish_reason=openai_mapping.finish_reason(raw_reason),
            provider_finish_reason=raw_reason,
            usage=usage,
            response_id=response_id,
        )

    async def embed(
        self, model: str, inputs: tuple[str, ...], dimensions: int | None, timeout_s: float
    ) -> ProviderEmbedResult:
        """Embeddings in batches of `EMBED_BATCH_LIMIT` through the SDK client's `post`, asking
        for `encoding_format: float` and reading the JSON answer; see `Provider.embed`."""
        vectors: list[tuple[float, ...]] = []
        input_tokens = 0
        answered_model = model
        for start in range(0, len(inputs), EMBED_BATCH_LIMIT):
            body: dict[str, Any] = {
                "model": model,
                "input": list(inputs[start : start + EMBED_BATCH_LIMIT]),
                "encoding_format": "float",
            }
            if dimensions is not None:
                body["dimensions"] = dimensions
            raw = await self._call(
                model,
                timeout_s,
                lambda body=body: self._client.post(  # type: ignore[misc]
                    self._embeddings_path, body=body, cast_to=self._response_type, options={"timeout": timeout_s}
                ),
            )
            try:
                data = json.loads(raw.content)
                ordered = sorted(data["data"], key=lambda d: d["index"])
                batch_vectors = [tuple(float(x) for x in d["embedding"]) for d in ordered]
                usage = data.get("usage") or {}
            except (ValueError, KeyError, TypeError) as exc:
                raise errors.bad_response(self.name, model, f"embeddings body: {type(exc).__name__}: {exc}") from exc
            if len(batch_vectors) != len(body["input"]):
                raise errors.bad_response(
                    self.name, model, f"{len(batch_vectors)} vectors for {len(body['input'])} inputs"
                )
            vectors.extend(batch_vectors)
            input_tokens += int(usage.get("prompt_tokens") or 0)
            answered_model = data.get("model") or answered_model
        return ProviderEmbedResult(model=answered_model, vectors=tuple(vectors), usage=Usage(input_tokens=input_tokens))

    async def list_models(self, timeout_s: float) -> tuple[LiveModel, ...]:
        """Models from `GET /models` (Groq adds `context_window`, kept when present)."""
        page = await self._call("", timeout_s, lambda: self._client.models.list(timeout=timeout_s))
        return tuple(LiveModel(m.id, context_window=int(getattr(m, "context_window", 0) or 0)) for m in page.data)

    async def aclose(self) -> None:
        """Closes the client's connection pool."""
        await self._client.close()


SPEC = ProviderSpec(
    kind="openai",
    factory=OpenAIProvider,
    configure_hint="set OPENAI_API_KEY (and OPENAI_BASE_URL for an OpenAI-compatible server)",
    api_key_env="OPENAI_API_KEY",
    base_url_env="OPENAI_BASE_URL",
    key="optional_with_base_url",
    default_base_url="https://api.openai.com/v1",
    passthrough_with_custom_base_url=True,
)
"""OpenAI, or any OpenAI-compatible server at `OPENAI_BASE_URL` (which then gets model ids the
catalog does not know)."""
