"""The provider adapter interface.

An adapter wraps one official SDK client (created once, pooled connections, SDK retries off) and
translates domain requests to the provider's wire format and back. Adapters raise only
`GatewayError` (built with `providers.errors`); `asyncio.CancelledError` passes through so that a
client cancel or a deadline closes the upstream HTTP request.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..domain import (
    ChatRequest,
    LiveModel,
    OptionWarning,
    ProviderChatResult,
    ProviderEmbedResult,
    ProviderStreamEvent,
    TokenCount,
)
from . import tokens

HttpClientKind = Literal["aiohttp", "httpx"]


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """What an adapter is built from: its settings with the key and defaults resolved.

    Attributes:
        name: provider name in the registry, e.g. "openai" or "vllm".
        api_key: the provider key (None for providers that take none).
        base_url: API root as the SDK expects it (None: the SDK's default).
        passthrough: route models absent from the catalog to this provider.
        max_connections: HTTP connection pool size.
        http_client: the HTTP transport under a Stainless SDK ("aiohttp" or "httpx").
    """

    name: str
    api_key: str | None = None
    base_url: str | None = None
    passthrough: bool = False
    max_connections: int = 200
    http_client: HttpClientKind = "aiohttp"


KeyPolicy = Literal["required", "optional_with_base_url", "unused"]


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """How a provider kind is configured; each adapter module declares one (`SPEC`), and the
    registry, config validation and environment discovery are derived from the declarations.

    Attributes:
        kind: the `providers[].kind` value, e.g. "anthropic"; also the name of the provider the
            environment discovers.
        factory: builds the adapter from its config.
        configure_hint: how to configure it, shown in PROVIDER_NOT_CONFIGURED errors.
        api_key_env: the SDK's standard key variable, e.g. "ANTHROPIC_API_KEY".
        base_url_env: the SDK's standard base-URL (or host) variable.
        key: "required"; "optional_with_base_url" (a key is needed only for the SDK's default
            base URL: a compatible server may need none); "unused".
        default_base_url: the SDK's default API root (a different one is a custom server).
        passthrough_with_custom_base_url: a custom server receives model ids the catalog does not
            know (it serves whatever it serves).
        strip_base_url_suffix: a suffix operators often add that the SDK adds itself (e.g. "/v1"
            for Anthropic): accepted and removed.
    """

    kind: str
    factory: Callable[[ProviderConfig], Provider]
    configure_hint: str
    api_key_env: str | None = None
    base_url_env: str | None = None
    key: KeyPolicy = "required"
    default_base_url: str | None = None
    passthrough_with_custom_base_url: bool = False
    strip_base_url_suffix: str = ""

    @property
    def discovery_env(self) -> tuple[str, ...]:
        """Variables whose presence brings the provider up with no config file."""
        names = [self.api_key_env] if self.key != "unused" else []
        if self.key != "required":
            names.append(self.base_url_env)
        return tuple(n for n in names if n)

    def normalized_base_url(self, base_url: str | None) -> str | None:
        """`base_url` without a trailing slash and without `strip_base_url_suffix`."""
        if not base_url:
            return None
        url = base_url.rstrip("/")
        if self.strip_base_url_suffix and url.endswith(self.strip_base_url_suffix):
            url = url[: -len(self.strip_base_url_suffix)]
        return url

    def is_custom(self, base_url: str | None) -> bool:
        """Whether `base_url` points elsewhere than the SDK's default."""
        normalized = self.normalized_base_url(base_url)
        return normalized is not None and normalized != (self.default_base_url or "").rstrip("/")


class Provider(abc.ABC):
    """One configured provider (e.g. "openai", "ollama", a named OpenAI-compatible server).

    Built from a `ProviderConfig`; subclasses create their SDK client in `_make_client`.

    Attributes:
        name: configured provider name, unique in the registry.
        kind: adapter kind, e.g. "openai" or "ollama".
        passthrough: whether models absent from the catalog may be routed here by id.
        requires_max_output_tokens: the API needs an output limit on every call (the router fills
            in the catalog's, see `Router`).
        supports_embeddings: the provider has an embeddings API.
    """

    name: str
    kind: str
    passthrough: bool
    requires_max_output_tokens: bool = False
    supports_embeddings: bool = True

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.passthrough = config.passthrough
        self._client = self._make_client(config)

    @abc.abstractmethod
    def _make_client(self, config: ProviderConfig) -> Any:
        """The provider's SDK client (one per provider, pooled connections, SDK retries off)."""

    @abc.abstractmethod
    def chat_warnings(self, request: ChatRequest) -> tuple[OptionWarning, ...]:
        """Returns the warnings for options this provider drops (pure, cheap: it does not build
        the request). Options it cannot honour at all fail the call with INVALID_ARGUMENT."""

    @abc.abstractmethod
    async def chat(self, request: ChatRequest, model: str, timeout_s: float) -> ProviderChatResult:
        """Runs one non-streamed chat.

        Args:
            request: the domain request (its `model` is the client's name; use `model`).
            model: the provider's model id.
            timeout_s: upper bound for the HTTP call, seconds (the caller's remaining deadline).
        Raises:
            GatewayError: every upstream failure, mapped by `providers.errors`.
        """

    @abc.abstractmethod
    def chat_stream(self, request: ChatRequest, model: str, timeout_s: float) -> AsyncIterator[ProviderStreamEvent]:
        """Streams one chat: `ChatDelta` events, then exactly one `ProviderStreamEnd`.

        An upstream stream that ends without its end marker or finish reason raises
        GatewayError (PROVIDER_BAD_RESPONSE) instead of ending quietly.
        """

    @abc.abstractmethod
    async def embed(
        self, model: str, inputs: tuple[str, ...], dimensions: int | None, timeout_s: float
    ) -> ProviderEmbedResult:
        """Embeds `inputs` (one vector per input, in order), batching to the provider's limit."""

    async def count_tokens(self, request: ChatRequest, model: str, timeout_s: float) -> TokenCount:
        """Input tokens of `request` on `model`: the OpenAI tokenizer for OpenAI-family model ids,
        otherwise the documented estimate. Adapters with a counting endpoint override this."""
        del timeout_s
        return tokens.count_with_tokenizer(request, model, self.name) or tokens.estimate(request, model, self.name)

    @abc.abstractmethod
    async def list_models(self, timeout_s: float) -> tuple[LiveModel, ...]:
        """The provider's live model list, with what the provider tells of each model."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Closes the SDK client and its connection pool."""
