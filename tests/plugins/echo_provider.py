"""A throwaway provider declared in one module, as a new adapter would be: its adapter class and
its `SPEC` (kind, environment variables, hint, key policy, factory). `register(SPEC)` makes the
gateway know it; nothing else in the server changes."""

from __future__ import annotations

from collections.abc import AsyncIterator

from llm_gateway_server.domain import (
    ChatDelta,
    ChatRequest,
    FinishReason,
    LiveModel,
    OptionWarning,
    ProviderChatResult,
    ProviderEmbedResult,
    ProviderStreamEnd,
    ProviderStreamEvent,
    Usage,
)
from llm_gateway_server.providers.base import Provider, ProviderConfig, ProviderSpec


class EchoProvider(Provider):
    """Answers `echo(<key>): <last message text>`; embeds each input as (its length,)."""

    kind = "echo"

    def _make_client(self, config: ProviderConfig) -> str:
        return config.api_key or ""

    def chat_warnings(self, request: ChatRequest) -> tuple[OptionWarning, ...]:
        return ()

    async def chat(self, request: ChatRequest, model: str, timeout_s: float) -> ProviderChatResult:
        text = f"echo({self._client[:2]}): {request.messages[-1].text}"
        return ProviderChatResult(model, text, (), FinishReason.STOP, "stop", Usage(input_tokens=3, output_tokens=4))

    async def chat_stream(
        self, request: ChatRequest, model: str, timeout_s: float
    ) -> AsyncIterator[ProviderStreamEvent]:
        for word in request.messages[-1].text.split():
            yield ChatDelta(text=word)
        yield ProviderStreamEnd(model, FinishReason.STOP, "stop", Usage(input_tokens=3, output_tokens=4))

    async def embed(
        self, model: str, inputs: tuple[str, ...], dimensions: int | None, timeout_s: float
    ) -> ProviderEmbedResult:
        return ProviderEmbedResult(model, tuple((float(len(t)),) for t in inputs), Usage(input_tokens=len(inputs)))

    async def list_models(self, timeout_s: float) -> tuple[LiveModel, ...]:
        return (LiveModel("echo-live"),)

    async def aclose(self) -> None:
        return None


SPEC = ProviderSpec(
    kind="echo",
    factory=EchoProvider,
    configure_hint="set ECHO_API_KEY",
    api_key_env="ECHO_API_KEY",
    base_url_env="ECHO_BASE_URL",
)
