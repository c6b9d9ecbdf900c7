"""Groq on the official `groq` SDK: the OpenAI Chat Completions protocol with Groq's differences
(shared/reference/provider-wire-formats.md §2):

* base URL without the API prefix (the SDK adds `/openai/v1/...`; `GROQ_BASE_URL` overrides it);
* no `stream_options` parameter: stream usage comes in the final chunk's `x_groq.usage`;
* `messages[].name` is rejected with 400, so names are dropped with a warning;
* no embeddings API (the router refuses Embed with CAPABILITY_NOT_SUPPORTED first);
* error bodies are stored whole in `e.body` (`{"error": {...}}`), handled by `error_fields`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import httpx

from ..domain import ChatRequest, OptionWarning, ProviderEmbedResult, Usage
from ..errors import capability_not_supported
from . import openai_mapping
from .base import ProviderConfig, ProviderSpec
from .openai_adapter import OpenAIProvider
from .sdk_http import sdk_http_client


class GroqProvider(OpenAIProvider):
    """Adapter for Groq's API (see module docstring); arguments as for `OpenAIProvider`, with
    `base_url` the API root without `/openai/v1` (None: the SDK default, api.groq.com)."""

    kind = "groq"
    supports_embeddings = False
    _chat_path: ClassVar[str] = "openai/v1/chat/completions"
    _usage_keys: ClassVar[tuple[str, ...]] = ("x_groq", "usage")

    def _make_client(self, config: ProviderConfig) -> Any:
        import groq  # noqa: PLC0415 - imported only when configured

        self._sdk = groq
        return groq.AsyncGroq(
            api_key=config.api_key,
            base_url=config.base_url,
            max_retries=0,
            http_client=sdk_http_client(groq, httpx.Limits, config.http_client, config.max_connections),
        )

    def chat_warnings(self, request: ChatRequest) -> tuple[OptionWarning, ...]:
        """OpenAI's warnings, plus message names (Groq rejects them; `_chat_params` drops them)."""
        names = (OptionWarning("OPTION_DROPPED", "messages[].name", "Groq rejects message names"),)
        return (*(names if any(m.name for m in request.messages) else ()), *super().chat_warnings(request))

    def _chat_params(self, request: ChatRequest, model: str, *, stream: bool) -> dict[str, Any]:
        if any(m.name for m in request.messages):
            request = dataclasses.replace(
                request, messages=tuple(dataclasses.replace(m, name="") for m in request.messages)
            )
        params = openai_mapping.chat_params(request, model, stream=stream)
        params.pop("stream_options", None)
        return params

    def _chunk_usage(self, chunk: dict[str, Any]) -> Usage | None:
        """`x_groq.usage` of the final chunk (or a top-level `usage`, should Groq send one)."""
        x_groq = chunk.get("x_groq")
        usage = (x_groq.get("usage") if isinstance(x_groq, dict) else None) or chunk.get("usage")
        return openai_mapping.usage_from_wire(usage)

    async def embed(
        self, model: str, inputs: tuple[str, ...], dimensions: int | None, timeout_s: float
    ) -> ProviderEmbedResult:
        """Groq has no embeddings API; the router refuses before calling. Raises GatewayError."""
        raise capability_not_supported(
            model, "embeddings", provider=self.name, detail=f"provider {self.name!r} (Groq) has no embeddings API"
        )


SPEC = ProviderSpec(
    kind="groq",
    factory=GroqProvider,
    configure_hint="set GROQ_API_KEY",
    api_key_env="GROQ_API_KEY",
    base_url_env="GROQ_BASE_URL",
    default_base_url="https://api.groq.com",
    # The SDK adds `/openai/v1/...` itself.
    strip_base_url_suffix="/openai/v1",
)
"""Groq's OpenAI-compatible API."""
