"""Anthropic on the official `anthropic` SDK (2.x: API version 2026-10-21; httpx2 interface over an
aiohttp transport by default, see `sdk_http`).

One `AsyncAnthropic` client per configured provider, reused, `max_retries=0`. Each call passes
`timeout=` from the caller's remaining deadline (which also skips the SDK's client-side refusal of
large non-streamed `max_tokens`); cancelling the awaiting task closes the upstream request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any, ClassVar

import httpx2

from ..domain import (
    Capability,
    ChatDelta,
    ChatRequest,
    LiveModel,
    OptionWarning,
    ProviderChatResult,
    ProviderEmbedResult,
    ProviderStreamEnd,
    ProviderStreamEvent,
    TokenCount,
    TokenCountMethod,
    ToolCallDelta,
)
from ..errors import GatewayError, capability_not_supported
from . import anthropic_mapping, errors
from .base import Provider, ProviderConfig, ProviderSpec
from .sdk_http import sdk_http_client
from .stainless_errors import SdkCalls

MODELS_PAGE_SIZE = 100
_ANTHROPIC_CAPABILITIES = frozenset(
    {Capability.CHAT, Capability.STREAMING, Capability.TOOLS, Capability.VISION, Capability.JSON_MODE}
)


class AnthropicProvider(SdkCalls, Provider):
    """Adapter for the Anthropic Messages API.

    Built from a `ProviderConfig` whose `base_url` is the API root without `/v1` (None: the SDK
    default, api.anthropic.com; a trailing `/v1` is removed by `SPEC`).
    """

    kind = "anthropic"
    _wire: ClassVar[ModuleType] = anthropic_mapping
    requires_max_output_tokens = True
    supports_embeddings = False

    def _make_client(self, config: ProviderConfig) -> Any:
        # Imported on first use: the anthropic SDK takes ~2 s to import, paid only when configured.
        import anthropic  # noqa: PLC0415

        self._sdk = anthropic
        return anthropic.AsyncAnthropic(
            api_key=config.api_key,
            base_url=config.base_url,
            max_retries=0,
            http_client=sdk_http_client(anthropic, httpx2.Limits, config.http_client, config.max_connections),
        )

    def chat_warnings(self, request: ChatRequest) -> tuple[OptionWarning, ...]:
        """Warnings for the options Anthropic's API does not have (dropped)."""
        return anthropic_mapping.chat_warnings(request)

    async def chat(self, request: ChatRequest, model: str, timeout_s: float) -> ProviderChatResult:
        """Non-streamed chat; see `Provider.chat`."""
        params = anthropic_mapping.chat_params(request, model)
        message = await self._call(model, timeout_s, lambda: self._client.messages.create(**params, timeout=timeout_s))
        text, calls = anthropic_mapping.content_from_wire(message.content)
        return ProviderChatResult(
            model=message.model or model,
            text=text,
            tool_calls=calls,
            finish_reason=anthropic_mapping.finish_reason(message.stop_reason),
            provider_finish_reason=message.stop_reason or "",
            usage=anthropic_mapping.usage_from_wire(message.usage),
            response_id=message.id or "",
        )

    async def chat_stream(
        self, request: ChatRequest, model: str, timeout_s: float
    ) -> AsyncIterator[ProviderStreamEvent]:
        """Streamed chat from the SSE event sequence (message_start, content_block_*, message_delta,
        message_stop); see `Provider.chat_stream`."""
        params = anthropic_mapping.chat_params(request, model)
        stream = await self._call(
            model, timeout_s, lambda: self._client.messages.create(**params, stream=True, timeout=timeout_s)
        )
        start_usage: Any = None
        answered_model, response_id = model, ""
        stop_reason: str | None = None
        output_tokens: int | None = None
        call_index_by_block: dict[int, int] = {}
        try:
            async for event in stream:
                kind = event.type
                if kind == "message_start":
                    start_usage = event.message.usage
                    answered_model = event.message.model or model
                    response_id = event.message.id or ""
                elif kind == "content_block_start" and event.content_block.type == "tool_use":
                    ordinal = call_index_by_block.setdefault(event.index, len(call_index_by_block))
                    block = event.content_block
                    yield ChatDelta(tool_calls=(ToolCallDelta(index=ordinal, id=block.id, name=block.name),))
                elif kind == "content_block_delta":
                    delta = event.delta
                    if delta.type == "text_delta" and delta.text:
                        yield ChatDelta(text=delta.text)
                    elif delta.type == "input_json_delta" and delta.partial_json:
                        ordinal = call_index_by_block.setdefault(event.index, len(call_index_by_block))
                        yield ChatDelta(tool_calls=(ToolCallDelta(index=ordinal, arguments=delta.partial_json),))
                elif kind == "message_delta":
                    stop_reason = event.delta.stop_reason or stop_reason
                    output_tokens = int(event.usage.output_tokens or 0)
                elif kind == "message_stop":
                    if stop_reason is None:
                        raise errors.bad_response(self.name, model, "message_stop without a stop_reason")
                    usage = anthropic_mapping.usage_from_wire(start_usage, output_tokens) if start_usage else None
                    yield ProviderStreamEnd(
                        model=answered_model,
                        finish_reason=anthropic_mapping.finish_reason(stop_reason),
                        provider_finish_reason=stop_reason,
                        usage=usage,
                        response_id=response_id,
                    )
                    return
        except GatewayError:
            raise
        except Exception as exc:
            raise self._map(exc, model, timeout_s) from exc
        finally:
            await stream.close()
        raise errors.bad_response(self.name, model, "the stream ended before message_stop")

    async def embed(
        self, model: str, inputs: tuple[str, ...], dimensions: int | None, timeout_s: float
    ) -> ProviderEmbedResult:
        """Anthropic has no embeddings API; the router refuses before calling (see
        `supports_embeddings`). Raises GatewayError CAPABILITY_NOT_SUPPORTED if called anyway."""
        raise capability_not_supported(
            model, "embeddings", provider=self.name, detail=f"provider {self.name!r} (Anthropic) has no embeddings API"
        )

    async def count_tokens(self, request: ChatRequest, model: str, timeout_s: float) -> TokenCount:
        """Exact count from `POST /v1/messages/count_tokens`."""
        params = anthropic_mapping.chat_params(request, model)
        keep = {k: params[k] for k in ("model", "messages", "system", "tools", "tool_choice") if k in params}
        result = await self._call(
            model, timeout_s, lambda: self._client.messages.count_tokens(**keep, timeout=timeout_s)
        )
        return TokenCount(int(result.input_tokens), TokenCountMethod.PROVIDER, model=model, provider=self.name)

    async def list_models(self, timeout_s: float) -> tuple[LiveModel, ...]:
        """Models from `GET /v1/models`, following `has_more` pages; every Messages model chats,
        streams, calls tools and reads images (Anthropic models overview)."""

        async def collect() -> tuple[LiveModel, ...]:
            return tuple(
                [
                    LiveModel(
                        m.id,
                        display_name=m.display_name or m.id,
                        capabilities=_ANTHROPIC_CAPABILITIES,
                        context_window=int(getattr(m, "max_input_tokens", 0) or 0),
                        max_output_tokens=int(getattr(m, "max_tokens", 0) or 0),
                    )
                    async for m in self._client.models.list(limit=MODELS_PAGE_SIZE, timeout=timeout_s)
                ]
            )

        try:
            async with asyncio.timeout(timeout_s):
                return await collect()
        except TimeoutError as exc:
            raise errors.upstream_timeout(self.name, "", timeout_s) from exc
        except Exception as exc:
            raise self._map(exc, "", timeout_s) from exc

    async def aclose(self) -> None:
        """Closes the client's connection pool."""
        await self._client.close()


SPEC = ProviderSpec(
    kind="anthropic",
    factory=AnthropicProvider,
    configure_hint="set ANTHROPIC_API_KEY",
    api_key_env="ANTHROPIC_API_KEY",
    base_url_env="ANTHROPIC_BASE_URL",
    default_base_url="https://api.anthropic.com",
    # The SDK adds `/v1/messages` itself: `ANTHROPIC_BASE_URL=https://host/v1` would call /v1/v1/messages.
    strip_base_url_suffix="/v1",
)
"""Anthropic's Messages API."""
