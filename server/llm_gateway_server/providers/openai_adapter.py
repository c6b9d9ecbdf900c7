"""OpenAI and OpenAI-compatible servers (vLLM, llama.cpp, LM Studio, Together, …): the official
`openai` SDK (3.x) for configuration and the off-hot-path endpoints, `direct_http` for the hot path.

One `AsyncOpenAI` client per configured provider, created at start-up, with `max_retries=0` (the
gateway owns retries): its base URL, auth and default headers are what chat, streamed chat and
embeddings send on the provider's pooled session (`DirectHttp`); its own HTTP client serves the
model list. Each call's timeout is the caller's remaining deadline; cancelling the awaiting task
closes the upstream connection.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any, ClassVar

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
from .direct_http import sse_data
from .sdk_http import sdk_http_client
from .stainless_errors import SdkCalls

# Placeholder key for OpenAI-compatible servers that need none (the SDK refuses an empty key).
NO_KEY_PLACEHOLDER = "no-key-configured"
# Inputs per embeddings call. Source: OpenAI API reference, embeddings (max 2048 inputs per call).
EMBED_BATCH_LIMIT = 2048


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
    # Chat Completions and embeddings paths under the client's base URL.
    _chat_path: ClassVar[str] = "chat/completions"
    _embeddings_path: ClassVar[str] = "embeddings"
    # Stream chunk fields that can carry usage (`_chunk_usage` reads them).
    _usage_keys: ClassVar[tuple[str, ...]] = ("usage",)

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
        """Non-streamed chat on the pooled session (`DirectHttp.post_json`); see `Provider.chat`."""
        params = self._chat_params(request, model, stream=False)
        data = await self._http.post_json(self._chat_path, params, model, timeout_s)
        try:
            return openai_mapping.completion_from_wire(data, model)
        except (ValueError, AttributeError, TypeError, KeyError) as exc:
            raise errors.bad_response(self.name, model, f"{type(exc).__name__}: {exc}") from exc

    async def chat_stream(
        self, request: ChatRequest, model: str, timeout_s: float
    ) -> AsyncIterator[ProviderStreamEvent]:
        """Streamed chat over SSE (`data: <json>` events ending with `data: [DONE]`, reference
        §1.4) on the pooled session; see `Provider.chat_stream`. An `error` object inside the
        stream is an upstream error."""
        params = self._chat_params(request, model, stream=True)
        response = await self._http.open_stream(self._chat_path, params, model, timeout_s)
        raw_reason: str | None = None
        usage: Usage | None = None
        response_id = ""
        answered_model = model
        complete = False
        try:
            async for data in sse_data(response):
                if data.startswith(b"[DONE]"):
                    complete = True
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise errors.bad_response(self.name, model, "a stream event is not a JSON object")
                if chunk.get("error"):
                    message, code = openai_mapping.error_fields(chunk)
                    raise errors.from_http_status(self.name, model, -1, message, upstream_code=code)
                response_id = chunk.get("id") or response_id
                answered_model = chunk.get("model") or answered_model
                for key in self._usage_keys:  # most chunks carry `"usage": null` or none
                    if chunk.get(key):
                        usage = self._chunk_usage(chunk) or usage
                        break
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
        except Exception as exc:  # the connection's and the JSON parser's errors, mapped in one place
            raise self._http.map_error(exc, model, timeout_s) from exc
        finally:
            await self._http.end_stream(response, complete=complete)
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
        """Embeddings in batches of `EMBED_BATCH_LIMIT` on the pooled session, asking for
        `encoding_format: float`; see `Provider.embed`."""
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
            data = await self._http.post_json(self._embeddings_path, body, model, timeout_s)
            try:
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
