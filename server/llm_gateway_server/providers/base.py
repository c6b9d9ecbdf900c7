"""The provider adapter interface.

An adapter wraps one official SDK client (created once, pooled connections, SDK retries off) and
translates domain requests to the provider's wire format and back. Adapters raise only
`GatewayError` (built with `providers.errors`); `asyncio.CancelledError` passes through so that a
client cancel or a deadline closes the upstream HTTP request.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from ..domain import (
    ChatRequest,
    LiveModel,
    ProviderChatResult,
    ProviderEmbedResult,
    ProviderStreamEvent,
    TokenCount,
    Warning,
)
from . import tokens


class Provider(abc.ABC):
    """One configured provider (e.g. "openai", "ollama", a named OpenAI-compatible server).

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

    @abc.abstractmethod
    def plan_chat(self, request: ChatRequest) -> tuple[Warning, ...]:
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
