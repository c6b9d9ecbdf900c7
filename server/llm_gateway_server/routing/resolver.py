"""Model name → deployment (provider adapter + provider model id + catalog entry).

Resolution order for a requested name:
1. an exact catalog id (built-in or configured), e.g. "gpt-4o-mini" or "openai/gpt-oss-120b";
2. "provider/model" where `provider` is a configured provider name, e.g. "ollama/llama3.2";
3. the first configured provider with `passthrough` (an OpenAI-compatible server with a custom
   base URL by default), which receives the name unchanged;
otherwise NOT_FOUND / MODEL_NOT_FOUND. `RoutingOptions.provider` restricts the choice to one
provider.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..domain import ModelInfo
from ..errors import FieldViolation, invalid_request, model_not_found, provider_not_configured
from ..providers.base import Provider
from ..providers.registry import CONFIGURE_HINTS, ProviderRegistry
from .catalog import Catalog


@dataclass(frozen=True, slots=True)
class Deployment:
    """Where a call goes: the adapter, the provider's model id, and the catalog entry (None for
    a passthrough model the catalog does not know)."""

    provider: Provider
    provider_model: str
    info: ModelInfo | None


class Resolver:
    """Resolves requested model names against the catalog and the configured providers."""

    def __init__(self, catalog: Catalog, registry: ProviderRegistry) -> None:
        self._catalog = catalog
        self._registry = registry

    def resolve(self, model: str, provider_hint: str = "") -> Deployment:
        """The deployment for `model`.

        Raises:
            GatewayError: INVALID_ARGUMENT for an unknown `provider_hint`; NOT_FOUND /
                MODEL_NOT_FOUND for an unknown model; FAILED_PRECONDITION /
                PROVIDER_NOT_CONFIGURED when the model's provider has no configuration.
        """
        if provider_hint and self._registry.get(provider_hint) is None:
            raise invalid_request(
                [
                    FieldViolation(
                        "routing.provider",
                        f"provider {provider_hint!r} is not configured; configured: {self._configured()}",
                    )
                ]
            )
        info = self._catalog.get(model)
        if info is not None and (not provider_hint or info.provider == provider_hint):
            provider = self._registry.get(info.provider)
            if provider is None:
                raise provider_not_configured(
                    info.provider, model, CONFIGURE_HINTS.get(info.provider, "add it to `providers:`")
                )
            return Deployment(provider, info.provider_model, info)
        prefix, _, rest = model.partition("/")
        if rest and self._registry.get(prefix) is not None and (not provider_hint or prefix == provider_hint):
            provider = self._registry.get(prefix)
            assert provider is not None
            return Deployment(provider, rest, self._catalog.get_by_provider_model(prefix, rest))
        if provider_hint:
            hinted = self._registry.get(provider_hint)
            assert hinted is not None
            if hinted.passthrough:
                return Deployment(hinted, model, self._catalog.get_by_provider_model(provider_hint, model))
            raise model_not_found(model, f"provider {provider_hint!r} has no such model in the catalog")
        passthrough = self._registry.passthrough()
        if passthrough is not None:
            return Deployment(passthrough, model, None)
        raise model_not_found(model, self._hint())

    def configured_providers(self) -> tuple[str, ...]:
        """Names of the configured providers."""
        return self._registry.names()

    def _configured(self) -> str:
        return ", ".join(self._registry.names()) or "none"

    def _hint(self) -> str:
        return f"use a catalog id (ListModels), or 'provider/model' with a configured provider ({self._configured()})"
