"""Anthropic: the official `anthropic` SDK (2.x: API version 2026-10-21) for configuration and the
off-hot-path endpoints (token counting, model list), `direct_http` for the hot path.

One `AsyncAnthropic` client per configured provider, created at start-up, `max_retries=0`: its base
URL, auth and default headers (including `anthropic-version`) are what chat and streamed chat send
on the provider's pooled session. Each call's timeout is the caller's remaining deadline;
cancelling the awaiting task closes the upstream connection.
"""

from __future__ import annotations

import asyncio
import json
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
from .direct_http import sse_data
from .sdk_http import sdk_http_client
from .stainless_errors import SdkCalls

MODELS_PAGE_SIZE = 100
MESSAGES_PATH = "v1/messages"
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
        """Non-streamed chat (`POST /v1/messages`) on the pooled session; see `Provider.chat`."""
        params = anthropic_mapping.chat_params(request, model)
        data = await self._http.post_json(MESSAGES_PATH, params, model, timeout_s)
        try:
            return anthropic_mapping.message_from_wire(data, model)
        except (TypeError, KeyError, ValueError) as exc:
            raise errors.bad_response(self.name, model, f"{type(exc).__name__}: {exc}") from exc

    async def chat_stream(
        self, request: ChatRequest, model: str, timeout_s: float
    ) -> AsyncIterator[ProviderStreamEvent]:
        """Streamed chat from the SSE event sequence (message_start, content_block_*, message_delta,
        message_stop; an `error` event is an upstream error) on the pooled session; see
        `Provider.chat_stream`."""
        params = anthropic_mapping.chat_params(request, model)
        params["stream"] = True
        response = await self._http.open_stream(MESSAGES_PATH, params, model, timeout_s)
        start_usage: object = None
        answered_model, response_id = model, ""
        stop_reason: str | None = None
        output_tokens: int | None = None
        call_index_by_block: dict[int, int] = {}
        complete = False
        try:
            async for data in sse_data(response):
                event = json.loads(data)
                kind = event.get("type") if isinstance(event, dict) else None
                if kind == "content_block_delta":
                    delta = event["delta"]
                    delta_type = delta.get("type")
                    if delta_type == "text_delta" and delta.get("text"):
                        yield ChatDelta(text=str(delta["text"]))
                    elif delta_type == "input_json_delta" and delta.get("partial_json"):
                        ordinal = call_index_by_block.setdefault(event["index"], len(call_index_by_block))
                        arguments = str(delta["partial_json"])
                        yield ChatDelta(tool_calls=(ToolCallDelta(index=ordinal, arguments=arguments),))
                elif kind == "message_start":
                    message = event["message"]
                    start_usage = message.get("usage")
                    answered_model = str(message.get("model") or model)
                    response_id = str(message.get("id") or "")
                elif kind == "content_block_start":
                    block = event["content_block"]
                    if block.get("type") == "tool_use":
                        ordinal = call_index_by_block.setdefault(event["index"], len(call_index_by_block))
                        yield ChatDelta(
                            tool_calls=(ToolCallDelta(index=ordinal, id=str(block["id"]), name=str(block["name"])),)
                        )
                elif kind == "message_delta":
                    stop_reason = event["delta"].get("stop_reason") or stop_reason
                    output_tokens = int((event.get("usage") or {}).get("output_tokens") or 0)
                elif kind == "message_stop":
                    complete = True
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
                elif kind == "error":
                    message_text, code = anthropic_mapping.error_fields(event)
                    raise errors.from_http_status(self.name, model, -1, message_text, upstream_code=code)
                elif kind is None:
                    raise errors.bad_response(self.name, model, "a stream event is not a JSON object with a type")
        except GatewayError:
            raise
        except Exception as exc:  # the connection's and the JSON parser's errors, mapped in one place
            raise self._http.map_error(exc, model, timeout_s) from exc
        finally:
            await self._http.end_stream(response, complete=complete)
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
