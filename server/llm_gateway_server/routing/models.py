"""ListModels / GetModel: the catalog merged with each configured provider's live model list.

Live lists are fetched on demand, cached per provider for `ttl_s`, bounded by `fetch_timeout_s`;
a provider that fails to answer keeps its last good list (or none) and is logged, so listing
never fails because one provider is down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json

import structlog

from ..domain import Availability, Capability, LiveModel, ModelInfo, ModelPage, ModelSource, ModelView
from ..errors import FieldViolation, GatewayError, invalid_request, model_not_found
from ..providers.registry import ProviderRegistry
from .breaker import BreakerState
from .catalog import Catalog
from .state import DeploymentStates

log = structlog.get_logger(__name__)

DEFAULT_PAGE_SIZE = 100
# A live model whose provider says nothing about it is assumed to chat and stream.
_DEFAULT_LIVE_CAPABILITIES = frozenset({Capability.CHAT, Capability.STREAMING})
MAX_PAGE_SIZE = 1000


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
        self._live: dict[str, tuple[float, tuple[LiveModel, ...]]] = {}
        self._lock = asyncio.Lock()

    async def _live_models(self, provider_name: str) -> tuple[LiveModel, ...]:
        loop = asyncio.get_running_loop()
        cached = self._live.get(provider_name)
        if cached is not None and loop.time() - cached[0] < self._ttl_s:
            return cached[1]
        provider = self._registry.get(provider_name)
        assert provider is not None
        try:
            models = await provider.list_models(self._fetch_timeout_s)
        except GatewayError as error:
            log.warning("model_list_failed", provider=provider_name, reason=error.reason, error=error.message)
            models = cached[1] if cached else ()
        self._live[provider_name] = (loop.time(), models)
        return models

    async def _entries(self) -> list[ModelInfo]:
        async with self._lock:
            names = self._registry.names()
            lists = await asyncio.gather(*(self._live_models(n) for n in names))
        entries = list(self._catalog.all())
        for name, models in zip(names, lists, strict=True):
            for live in models:
                if self._catalog.get_by_provider_model(name, live.id) is None and self._catalog.get(live.id) is None:
                    entries.append(
                        ModelInfo(
                            id=f"{name}/{live.id}",
                            provider=name,
                            provider_model=live.id,
                            display_name=live.display_name or live.id,
                            capabilities=live.capabilities or _DEFAULT_LIVE_CAPABILITIES,
                            context_window=live.context_window,
                            max_output_tokens=live.max_output_tokens,
                            source=ModelSource.PROVIDER,
                        )
                    )
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

        Raises:
            GatewayError: INVALID_ARGUMENT for a bad page size or a token from other filters.
        """
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise invalid_request([FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")])
        size = page_size or DEFAULT_PAGE_SIZE
        filters = f"{provider}|{capability or ''}"
        offset = _decode_token(page_token, filters) if page_token else 0
        matching = [
            m
            for m in await self._entries()
            if (not provider or m.provider == provider) and (capability is None or capability in m.capabilities)
        ]
        page = matching[offset : offset + size]
        next_offset = offset + len(page)
        token = _encode_token(next_offset, filters) if next_offset < len(matching) else ""
        return ModelPage(models=tuple(self._view(m) for m in page), next_page_token=token, total_size=len(matching))

    async def get(self, name: str) -> ModelView:
        """The model called `models/{id}` or `{id}`.

        Raises:
            GatewayError: INVALID_ARGUMENT for an empty name; NOT_FOUND / MODEL_NOT_FOUND.
        """
        model_id = name.removeprefix("models/")
        if not model_id:
            raise invalid_request([FieldViolation("name", "required: 'models/{id}' or '{id}'")])
        info = self._catalog.get(model_id)
        if info is None:
            info = next((m for m in await self._entries() if m.id == model_id), None)
        if info is None:
            raise model_not_found(model_id, "ListModels shows the known models")
        return self._view(info)


def _encode_token(offset: int, filters: str) -> str:
    raw = json.dumps({"o": offset, "f": filters}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, filters: str) -> int:
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        offset = int(data["o"])
        same = data["f"] == filters
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise invalid_request(
            [FieldViolation("page_token", "not a token from a previous ListModels response")]
        ) from None
    if not same or offset < 0:
        raise invalid_request([FieldViolation("page_token", "was issued for different filters")])
    return offset
