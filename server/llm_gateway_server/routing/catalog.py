"""The model catalog: built-in data (`data/models.yaml`) extended/overridden by configuration.

Loaded once at start-up into an immutable index; lookups are dictionary reads on the hot path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from importlib import resources

import yaml

from ..config import ModelSettings
from ..domain import Capability, ModelInfo, ModelSource, Pricing


class Catalog:
    """An immutable index of `ModelInfo` by client id and by (provider, provider model).

    Entries are ordered by (provider, id) for listing.
    """

    def __init__(self, entries: Iterable[ModelInfo]) -> None:
        by_id: dict[str, ModelInfo] = {}
        for entry in entries:
            by_id[entry.id] = entry  # later entries (configuration) replace earlier ones
        self._by_id = by_id
        self._by_provider_model = {(m.provider, m.provider_model): m for m in by_id.values()}
        self._ordered = tuple(sorted(by_id.values(), key=lambda m: (m.provider, m.id)))
        groups: dict[str, list[ModelInfo]] = {}
        for model in self._ordered:
            if model.equivalence_group:
                groups.setdefault(model.equivalence_group, []).append(model)
        self._groups = {name: tuple(members) for name, members in groups.items()}

    def get(self, model_id: str) -> ModelInfo | None:
        """The entry whose client id is `model_id`, or None."""
        return self._by_id.get(model_id)

    def get_by_provider_model(self, provider: str, provider_model: str) -> ModelInfo | None:
        """The entry served by `provider` under its own id `provider_model`, or None."""
        return self._by_provider_model.get((provider, provider_model))

    def all(self) -> tuple[ModelInfo, ...]:
        """Every entry, ordered by (provider, id)."""
        return self._ordered

    def equivalents(self, model: ModelInfo) -> tuple[str, ...]:
        """Ids of models in `model`'s equivalence group on other providers (catalog order)."""
        if not model.equivalence_group:
            return ()
        return tuple(m.id for m in self._groups.get(model.equivalence_group, ()) if m.provider != model.provider)

    def with_capability(self, capability: Capability, providers: Sequence[str] | None = None) -> tuple[str, ...]:
        """Ids of models with `capability`, optionally only of the given providers."""
        return tuple(
            m.id
            for m in self._ordered
            if capability in m.capabilities and (providers is None or m.provider in providers)
        )


def _entry(raw: ModelSettings, source: ModelSource) -> ModelInfo:
    pricing = None
    if raw.pricing is not None:
        pricing = Pricing(
            input_per_million_usd=raw.pricing.input_per_million_usd,
            output_per_million_usd=raw.pricing.output_per_million_usd,
            cached_input_per_million_usd=raw.pricing.cached_input_per_million_usd,
            source=raw.pricing.source,
        )
    return ModelInfo(
        id=raw.id,
        provider=raw.provider,
        provider_model=raw.provider_model or raw.id,
        display_name=raw.display_name or raw.id,
        capabilities=frozenset(raw.capabilities),
        context_window=raw.context_window,
        max_output_tokens=raw.max_output_tokens,
        pricing=pricing,
        equivalence_group=raw.equivalence_group,
        source=source,
    )


def builtin_models() -> tuple[ModelSettings, ...]:
    """The built-in catalog data, validated (a broken data file fails loudly at start-up)."""
    text = resources.files("llm_gateway_server").joinpath("data/models.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    return tuple(ModelSettings.model_validate(item) for item in data["models"])


@functools.cache
def _builtin_entries() -> tuple[ModelInfo, ...]:
    """The built-in catalog as `ModelInfo` entries, parsed and validated once per process.

    The data file ships inside the package and cannot change while the process runs, and the
    entries are immutable (frozen dataclasses, frozensets), so every `load_catalog` call can share
    them: parsing the YAML (pure-Python PyYAML) and validating it costs ~12 ms, once per gateway
    built, which the test suite does hundreds of times in one process. `builtin_models` stays
    uncached: it returns mutable `ModelSettings`. A broken data file still fails the first load.
    """
    return tuple(_entry(m, ModelSource.CATALOG) for m in builtin_models())


def load_catalog(configured: Iterable[ModelSettings] = ()) -> Catalog:
    """The built-in catalog with the configuration's `models:` entries added or replacing by id."""
    entries = list(_builtin_entries())
    entries.extend(_entry(m, ModelSource.CONFIG) for m in configured)
    return Catalog(entries)
