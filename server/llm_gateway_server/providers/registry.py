"""Builds the provider adapters from settings: one adapter (one pooled SDK client) per provider.

Adding a provider kind is one adapter module plus one line in `_FACTORIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..config import NO_KEY_PLACEHOLDER, ConfigError, ProviderSettings
from .base import Provider
from .ollama_adapter import OllamaProvider
from .openai_adapter import OpenAIProvider

# How to configure each known provider when it is missing (shown in PROVIDER_NOT_CONFIGURED errors).
CONFIGURE_HINTS: Mapping[str, str] = {
    "openai": "set OPENAI_API_KEY (and OPENAI_BASE_URL for an OpenAI-compatible server)",
    "anthropic": "set ANTHROPIC_API_KEY",
    "groq": "set GROQ_API_KEY",
    "ollama": "set OLLAMA_HOST, e.g. http://127.0.0.1:11434",
}


def _openai(settings: ProviderSettings, environ: Mapping[str, str]) -> Provider:
    key = settings.resolved_api_key(environ)
    if key is None:
        if not settings.resolved_passthrough():
            raise ConfigError(
                f"provider {settings.name!r}: no API key (set {settings.api_key_env or 'api_key'}); only a custom "
                "OpenAI-compatible base_url may run without one"
            )
        key = NO_KEY_PLACEHOLDER
    return OpenAIProvider(
        settings.name,
        api_key=key,
        base_url=settings.base_url,
        passthrough=settings.resolved_passthrough(),
        max_connections=settings.max_connections,
        http_client=settings.http_client,
    )


def _keyed(settings: ProviderSettings, environ: Mapping[str, str]) -> str:
    key = settings.resolved_api_key(environ)
    if key is None:
        raise ConfigError(f"provider {settings.name!r}: no API key (set {settings.api_key_env or 'api_key'})")
    return key


def _anthropic(settings: ProviderSettings, environ: Mapping[str, str]) -> Provider:
    # Imported on demand: the anthropic SDK takes ~2 s to import, paid only when configured.
    from .anthropic_adapter import AnthropicProvider  # noqa: PLC0415

    return AnthropicProvider(
        settings.name,
        api_key=_keyed(settings, environ),
        base_url=settings.base_url,
        passthrough=settings.resolved_passthrough(),
        max_connections=settings.max_connections,
        http_client=settings.http_client,
    )


def _groq(settings: ProviderSettings, environ: Mapping[str, str]) -> Provider:
    from .groq_adapter import GroqProvider  # noqa: PLC0415 - imported only when configured

    return GroqProvider(
        settings.name,
        api_key=_keyed(settings, environ),
        base_url=settings.base_url,
        passthrough=settings.resolved_passthrough(),
        max_connections=settings.max_connections,
        http_client=settings.http_client,
    )


def _ollama(settings: ProviderSettings, environ: Mapping[str, str]) -> Provider:
    del environ
    return OllamaProvider(
        settings.name,
        host=settings.base_url,
        passthrough=settings.resolved_passthrough(),
        max_connections=settings.max_connections,
    )


_FACTORIES: Mapping[str, Callable[[ProviderSettings, Mapping[str, str]], Provider]] = {
    "openai": _openai,
    "anthropic": _anthropic,
    "groq": _groq,
    "ollama": _ollama,
}


class ProviderRegistry:
    """The configured providers by name, in configuration order."""

    def __init__(self, providers: Mapping[str, Provider]) -> None:
        self._providers = dict(providers)
        self._passthrough = next((p for p in self._providers.values() if p.passthrough), None)

    def get(self, name: str) -> Provider | None:
        """The provider called `name`, or None when not configured."""
        return self._providers.get(name)

    def names(self) -> tuple[str, ...]:
        """Configured provider names, in configuration order."""
        return tuple(self._providers)

    def passthrough(self) -> Provider | None:
        """The first provider that accepts model ids absent from the catalog, or None."""
        return self._passthrough

    async def aclose(self) -> None:
        """Closes every adapter's connection pool."""
        for provider in self._providers.values():
            await provider.aclose()


def build_registry(settings: list[ProviderSettings], environ: Mapping[str, str]) -> ProviderRegistry:
    """Creates one adapter per provider setting.

    Raises:
        ConfigError: a provider lacks what its kind requires (e.g. an OpenAI key).
    """
    return ProviderRegistry({p.name: _FACTORIES[p.kind](p, environ) for p in settings})
