"""The provider kinds the gateway knows, and the configured providers built from settings.

Each adapter module (`providers/*_adapter.py`) declares its kind in a module-level `SPEC`
(`base.ProviderSpec`): environment variables, configuration hint, key policy and factory. The
kinds are collected from those declarations on first use (`specs()`), and config validation,
environment discovery and `build_registry` are derived from them. Adding a provider is one adapter
module (plus its catalog data); `register` adds a kind from elsewhere (tests, plug-ins).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping

from ..config import ConfigError, ProviderSettings
from .base import Provider, ProviderConfig, ProviderSpec

_SPECS: dict[str, ProviderSpec] = {}
_LOADED = False


def register(spec: ProviderSpec) -> None:
    """Adds (or replaces) a provider kind."""
    _SPECS[spec.kind] = spec


def unregister(kind: str) -> None:
    """Removes a provider kind added with `register` (no-op when unknown)."""
    _SPECS.pop(kind, None)


def specs() -> Mapping[str, ProviderSpec]:
    """Every known provider kind, the built-in adapter modules' declarations first (imported on
    the first call; SDKs that are slow to import are imported by their adapters only when one is
    built)."""
    global _LOADED  # noqa: PLW0603 - a load-once cache of the package's modules
    if not _LOADED:
        package = __name__.rsplit(".", 1)[0]
        for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
            if module.name.endswith("_adapter"):
                spec = getattr(importlib.import_module(f"{package}.{module.name}"), "SPEC", None)
                if isinstance(spec, ProviderSpec):
                    _SPECS.setdefault(spec.kind, spec)
        _LOADED = True
    return _SPECS


def configure_hint(kind: str) -> str:
    """How to configure provider `kind` (for PROVIDER_NOT_CONFIGURED messages)."""
    spec = specs().get(kind)
    return spec.configure_hint if spec else "add it to `providers:` in the config file"


def environment_providers(environ: Mapping[str, str]) -> list[ProviderSettings]:
    """Providers implied by the SDKs' standard variables (no config file needed), one per kind
    whose `discovery_env` is set, named after the kind."""
    found: list[ProviderSettings] = []
    for spec in specs().values():
        if any(environ.get(name) for name in spec.discovery_env):
            base_url = environ.get(spec.base_url_env) if spec.base_url_env else None
            found.append(
                ProviderSettings(
                    name=spec.kind, kind=spec.kind, base_url=base_url or None, api_key_env=spec.api_key_env
                )
            )
    return found


def provider_config(settings: ProviderSettings, environ: Mapping[str, str]) -> ProviderConfig:
    """The adapter config of one provider setting: key resolved (`api_key`, else the variable
    named by `api_key_env`, else the kind's standard variable), base URL normalised, passthrough
    defaulted from its kind.

    Raises:
        ConfigError: unknown kind, or no key where the kind requires one.
    """
    spec = specs().get(settings.kind)
    if spec is None:
        raise ConfigError(f"provider {settings.name!r}: unknown kind {settings.kind!r}; known: {', '.join(specs())}")
    custom = spec.is_custom(settings.base_url)
    passthrough = (
        settings.passthrough if settings.passthrough is not None else (spec.passthrough_with_custom_base_url and custom)
    )
    key = None
    if spec.key != "unused":
        key = settings.resolved_api_key(environ)
        if key is None and settings.api_key is None and settings.api_key_env is None and spec.api_key_env:
            key = environ.get(spec.api_key_env) or None  # as the SDK itself would read it
    if key is None and (spec.key == "required" or (spec.key == "optional_with_base_url" and not custom)):
        where = settings.api_key_env or spec.api_key_env or "api_key"
        extra = "; only a custom base_url may run without one" if spec.key == "optional_with_base_url" else ""
        raise ConfigError(f"provider {settings.name!r}: no API key (set {where}){extra}")
    return ProviderConfig(
        name=settings.name,
        api_key=key,
        base_url=spec.normalized_base_url(settings.base_url),
        passthrough=passthrough,
        max_connections=settings.max_connections,
        http_client=settings.http_client,
    )


class ProviderRegistry:
    """The configured providers by name, in configuration order.

    The passthrough provider (for model ids absent from the catalog) is the first configured one
    with `passthrough`: environment providers come first, then the config file's, in file order.
    """

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
    """Creates one adapter per provider setting, through its kind's factory.

    Raises:
        ConfigError: a provider lacks what its kind requires (e.g. an OpenAI key).
    """
    configs = [provider_config(p, environ) for p in settings]
    factories = [specs()[p.kind].factory for p in settings]
    return ProviderRegistry({c.name: factory(c) for c, factory in zip(configs, factories, strict=True)})
