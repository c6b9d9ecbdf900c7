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

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import AliasSettings, DeploymentSettings
from ..domain import ModelInfo, RoutingStrategy
from ..errors import FieldViolation, invalid_request, model_not_found, provider_not_configured
from ..providers.base import Provider
from ..providers.registry import ProviderRegistry, configure_hint
from .catalog import Catalog


@dataclass(frozen=True, slots=True)
class Deployment:
    """Where a call goes: the adapter, the provider's model id, the catalog entry (None for a
    passthrough model the catalog does not know), and the alias's weight, priority and optional
    per-deployment limits (requests / tokens per minute)."""

    provider: Provider
    provider_model: str
    info: ModelInfo | None
    weight: float = 1.0
    priority: int = 0
    rpm: int | None = None
    tpm: int | None = None

    @property
    def key(self) -> str:
        """`provider/model`: the identity of the deployment in state, logs and health."""
        return f"{self.provider.name}/{self.provider_model}"


@dataclass(frozen=True, slots=True)
class ModelGroup:
    """What a requested model name resolves to: its deployments, the alias's strategy (None: not
    an alias) and the models to fall back to."""

    name: str
    deployments: tuple[Deployment, ...]
    strategy: RoutingStrategy | None
    fallback_models: tuple[str, ...]


class Resolver:
    """Resolves requested model names against the catalog and the configured providers."""

    def __init__(self, catalog: Catalog, registry: ProviderRegistry, aliases: Sequence[AliasSettings] = ()) -> None:
        self._catalog = catalog
        self._registry = registry
        self._aliases = {a.name: a for a in aliases}

    def resolve_group(self, model: str, provider_hint: str = "", equivalents: bool = True) -> ModelGroup:
        """The deployments of `model` (an alias's, or the one `resolve` finds) and its fallbacks:
        the alias's `fallback_models`, else (with `equivalents`) the catalog's equivalent models.

        Raises:
            GatewayError: as `resolve`; for an alias whose providers are all unconfigured,
                FAILED_PRECONDITION / PROVIDER_NOT_CONFIGURED.
        """
        alias = self._aliases.get(model)
        if alias is None:
            deployment = self.resolve(model, provider_hint)
            same = self._catalog.equivalents(deployment.info) if equivalents and deployment.info else ()
            return ModelGroup(model, (deployment,), None, same)
        deployments = tuple(
            self._alias_deployment(d)
            for d in alias.deployments
            if self._registry.get(d.provider) is not None and (not provider_hint or d.provider == provider_hint)
        )
        if not deployments:
            first = alias.deployments[0].provider
            raise provider_not_configured(first, model, configure_hint(first))
        fallbacks: tuple[str, ...] = tuple(alias.fallback_models)
        if not fallbacks and equivalents and deployments[0].info:
            fallbacks = self._catalog.equivalents(deployments[0].info)
        return ModelGroup(model, deployments, RoutingStrategy(alias.strategy), fallbacks)

    def _alias_deployment(self, spec: DeploymentSettings) -> Deployment:
        provider = self._registry.get(spec.provider)
        assert provider is not None
        info = self._catalog.get(spec.model)
        if info is not None and info.provider == spec.provider:
            provider_model = info.provider_model
        else:
            provider_model = spec.model
            info = self._catalog.get_by_provider_model(spec.provider, spec.model)
        return Deployment(provider, provider_model, info, spec.weight, spec.priority, spec.rpm, spec.tpm)

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
                raise provider_not_configured(info.provider, model, configure_hint(info.provider))
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
