"""ListModels / GetModel: the catalog merged with each configured provider's live model list.

Live lists are fetched on demand and only where a request needs them: an unfiltered ListModels
fetches every configured provider's, `ListModels(provider=X)` only X's, `GetModel("models/X/m")`
only X's, and a catalog id none. Each list is cached per provider for `ttl_s`; a warm cache is
read without locks or awaits. A cold or expired list has at most one fetch in flight per provider
(concurrent callers share it; a caller's cancel does not cancel it), bounded by `fetch_timeout_s`.
A provider that fails to answer keeps its last good list (or none) until the next fetch after
`ttl_s` and is logged, so listing never fails because one provider is down; an unexpected error
reaches the callers of that fetch only and is not cached.

A live model is listed as `provider/model`, unless it is a catalog entry of the same provider
(Ollama: with its default tag, `llama3.2` and `llama3.2:latest` are one model), or its
`provider/model` id is itself a catalog id (which is what that name resolves to).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Sequence
from functools import partial

import structlog

from ..domain import Availability, Capability, LiveModel, ModelInfo, ModelPage, ModelSource, ModelView
from ..errors import FieldViolation, GatewayError, invalid_request, model_not_found
from ..providers.base import Provider
from ..providers.registry import ProviderRegistry
from .breaker import BreakerState
from .catalog import Catalog
from .deployment_state import DeploymentStates

log = structlog.get_logger(__name__)

DEFAULT_PAGE_SIZE = 100
# A live model whose provider says nothing about it is assumed to chat and stream.
_DEFAULT_LIVE_CAPABILITIES = frozenset({Capability.CHAT, Capability.STREAMING})
MAX_PAGE_SIZE = 1000
# Extra time, seconds, past `fetch_timeout_s` before the directory gives up on a fetch itself (the
# adapter's own timeout, with its better error, normally ends it first).
_FETCH_GRACE_S = 0.5
# Ollama names a model `name[:tag]`; no tag means this one.
_OLLAMA_DEFAULT_TAG = "latest"

LiveList = tuple[LiveModel, ...]


class ModelDirectory:
    """Answers model listing and lookup.

    Args:
        catalog: built-in + configured models.
        registry: configured providers (for availability and live lists).
        ttl_s: how long a live list is reused, seconds.
        fetch_timeout_s: bound on one live-list fetch, seconds.
        states: live deployment state (an open breaker shows as AVAILABILITY_DEGRADED).
    """

    def __init__(
        self,
        catalog: Catalog,
        registry: ProviderRegistry,
        ttl_s: float,
        fetch_timeout_s: float = 5.0,
        states: DeploymentStates | None = None,
    ) -> None:
        self._catalog = catalog
        self._states = states
        self._registry = registry
        self._ttl_s = ttl_s
        self._fetch_timeout_s = fetch_timeout_s
        # provider name -> (loop time of the fetch, s; the list it left)
        self._live: dict[str, tuple[float, LiveList]] = {}
        # provider name -> the one fetch in flight
        self._inflight: dict[str, asyncio.Task[LiveList]] = {}
        # provider name -> (the live list, its entries by id): rebuilt only when the list changes
        self._derived: dict[str, tuple[LiveList, dict[str, ModelInfo]]] = {}

    # --- live lists --------------------------------------------------------------------------

    def _fresh(self, provider_name: str) -> LiveList | None:
        cached = self._live.get(provider_name)
        if cached is not None and asyncio.get_running_loop().time() - cached[0] < self._ttl_s:
            return cached[1]
        return None

    async def _live_lists(self, names: Sequence[str]) -> list[LiveList]:
        """The live lists of the providers `names`, in order; awaits only lists not fresh."""
        lists = [self._fresh(name) for name in names]
        stale = [i for i, models in enumerate(lists) if models is None]
        if stale:
            # shield: a caller's cancel leaves the shared fetches running for the other callers
            fetched = await asyncio.gather(*(asyncio.shield(self._flight(names[i])) for i in stale))
            for i, models in zip(stale, fetched, strict=True):
                lists[i] = models
        return [models if models is not None else () for models in lists]

    def _flight(self, provider_name: str) -> asyncio.Task[LiveList]:
        """The fetch in flight for `provider_name`, started when there is none."""
        task = self._inflight.get(provider_name)
        if task is None or task.done():
            provider = self._registry.get(provider_name)
            assert provider is not None
            task = asyncio.get_running_loop().create_task(
                self._fetch(provider_name, provider), name=f"model-list:{provider_name}"
            )
            self._inflight[provider_name] = task
            task.add_done_callback(partial(self._landed, provider_name))
        return task

    def _landed(self, provider_name: str, task: asyncio.Task[LiveList]) -> None:
        if self._inflight.get(provider_name) is task:
            del self._inflight[provider_name]
        if not task.cancelled():
            task.exception()  # retrieved here too: every caller may have been cancelled meanwhile

    async def _fetch(self, provider_name: str, provider: Provider) -> LiveList:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._fetch_timeout_s + _FETCH_GRACE_S):
                models = await provider.list_models(self._fetch_timeout_s)
        except GatewayError as error:
            log.warning("model_list_failed", provider=provider_name, reason=error.reason, error=error.message)
            models = self._last_good(provider_name)
        except TimeoutError:
            log.warning(
                "model_list_failed",
                provider=provider_name,
                reason="PROVIDER_TIMEOUT",
                error=f"no model list within {self._fetch_timeout_s:.1f}s",
            )
            models = self._last_good(provider_name)
        self._live[provider_name] = (loop.time(), models)
        return models

    def _last_good(self, provider_name: str) -> LiveList:
        cached = self._live.get(provider_name)
        return cached[1] if cached is not None else ()

    # --- entries -----------------------------------------------------------------------------

    def _catalog_entry(self, provider_name: str, provider_model: str) -> ModelInfo | None:
        """The catalog entry `provider_name` serves as `provider_model` (Ollama: either with or
        without its default tag), or None."""
        info = self._catalog.get_by_provider_model(provider_name, provider_model)
        if info is not None:
            return info
        provider = self._registry.get(provider_name)
        if provider is None or provider.kind != "ollama":
            return None
        same = _ollama_same_model(provider_model)
        return self._catalog.get_by_provider_model(provider_name, same) if same else None

    def _live_entries(self, provider_name: str, models: LiveList) -> dict[str, ModelInfo]:
        """The entries (by id) of the live models of `provider_name` that the catalog lacks."""
        derived = self._derived.get(provider_name)
        if derived is not None and derived[0] is models:
            return derived[1]
        entries: dict[str, ModelInfo] = {}
        for live in models:
            model_id = f"{provider_name}/{live.id}"
            if (
                model_id in entries
                or self._catalog.get(model_id) is not None
                or self._catalog_entry(provider_name, live.id) is not None
            ):
                continue
            entries[model_id] = ModelInfo(
                id=model_id,
                provider=provider_name,
                provider_model=live.id,
                display_name=live.display_name or live.id,
                capabilities=live.capabilities or _DEFAULT_LIVE_CAPABILITIES,
                context_window=live.context_window,
                max_output_tokens=live.max_output_tokens,
                source=ModelSource.PROVIDER,
            )
        self._derived[provider_name] = (models, entries)
        return entries

    async def _entries(self, provider: str) -> list[ModelInfo]:
        """Catalog and live entries of `provider` (empty: of every provider), by (provider, id)."""
        if provider:
            names: Sequence[str] = (provider,) if self._registry.get(provider) is not None else ()
            entries = [m for m in self._catalog.all() if m.provider == provider]
        else:
            names = self._registry.names()
            entries = list(self._catalog.all())
        for name, models in zip(names, await self._live_lists(names), strict=True):
            entries.extend(self._live_entries(name, models).values())
        entries.sort(key=lambda m: (m.provider, m.id))
        return entries

    def _view(self, info: ModelInfo) -> ModelView:
        if self._registry.get(info.provider) is None:
            availability = Availability.NOT_CONFIGURED
        elif self._states and self._states.breaker_state(f"{info.provider}/{info.provider_model}") is BreakerState.OPEN:
            availability = Availability.DEGRADED
        else:
            availability = Availability.AVAILABLE
        return ModelView(
            info=info,
            availability=availability,
            equivalent_models=self._catalog.equivalents(info),
        )

    async def list(self, provider: str, capability: Capability | None, page_size: int, page_token: str) -> ModelPage:
        """One page of models matching the filters, ordered by (provider, id).

        Fetches the live list of `provider` only (empty `provider`: of every configured provider),
        each at most once per `ttl_s`.

        Args:
            provider: configured or catalog provider name; empty for all.
            capability: only models with this capability; None for all.
            page_size: models per page, 0 to `MAX_PAGE_SIZE` (0: `DEFAULT_PAGE_SIZE`).
            page_token: `next_page_token` of the previous page with the same filters; empty: first.
        Returns:
            up to `page_size` models, the token of the next page ("" after the last) and the
            number of models matching the filters.
        Raises:
            GatewayError: INVALID_ARGUMENT for a bad page size or a token from other filters.
        """
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise invalid_request([FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")])
        size = page_size or DEFAULT_PAGE_SIZE
        filters = f"{provider}|{capability or ''}"
        offset = _decode_token(page_token, filters) if page_token else 0
        matching = [m for m in await self._entries(provider) if capability is None or capability in m.capabilities]
        page = matching[offset : offset + size]
        next_offset = offset + len(page)
        token = _encode_token(next_offset, filters) if next_offset < len(matching) else ""
        return ModelPage(models=tuple(self._view(m) for m in page), next_page_token=token, total_size=len(matching))

    async def get(self, name: str) -> ModelView:
        """The model called `models/{id}` or `{id}`.

        A catalog id fetches nothing. `{provider}/{model}` with a configured provider is the
        catalog entry that provider serves as `model` (no fetch), else the provider's live model
        `model` (fetches that provider's live list only, at most once per `ttl_s`).

        Raises:
            GatewayError: INVALID_ARGUMENT for an empty name; NOT_FOUND / MODEL_NOT_FOUND.
        """
        model_id = name.removeprefix("models/")
        if not model_id:
            raise invalid_request([FieldViolation("name", "required: 'models/{id}' or '{id}'")])
        info = self._catalog.get(model_id)
        provider, _, provider_model = model_id.partition("/")
        if info is None and provider_model and self._registry.get(provider) is not None:
            info = self._catalog_entry(provider, provider_model)
            if info is None:
                (models,) = await self._live_lists((provider,))
                info = self._live_entries(provider, models).get(model_id)
        if info is None:
            raise model_not_found(model_id, "ListModels shows the known models")
        return self._view(info)


def _ollama_same_model(name: str) -> str:
    """The other spelling of Ollama model `name` with respect to its default tag
    (`llama3.2:latest` <-> `llama3.2`); "" when `name` has another tag."""
    base, colon, tag = name.rpartition(":")
    if not colon or "/" in tag:  # no tag (a ':' before the last '/' is a registry's port)
        return f"{name}:{_OLLAMA_DEFAULT_TAG}"
    return base if tag == _OLLAMA_DEFAULT_TAG else ""


def _encode_token(offset: int, filters: str) -> str:
    raw = json.dumps({"o": offset, "f": filters}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, filters: str) -> int:
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        offset = data["o"]
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise TypeError("offset")
        same = data["f"] == filters
    except (binascii.Error, ValueError, KeyError, TypeError, OverflowError):
        raise invalid_request(
            [FieldViolation("page_token", "not a token from a previous ListModels response")]
        ) from None
    if not same or offset < 0:
        raise invalid_request([FieldViolation("page_token", "was issued for different filters")])
    return offset
