"""The rate-limit layer under its former name and constructor, for the composition root until it
builds `interceptors.quota.QuotaInterceptor` itself (then this module goes).

`RateLimitInterceptor(backend, settings, keys, metrics, stream_max_age_s)` is a
`QuotaInterceptor` that reads the configured keys' own limits from `keys` when the call record
carries no tenant, and applies no budgets (it has no cost estimator).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import ApiKeySettings, BudgetSettings, RateLimitSettings
from ..state.base import QuotaBackend
from ..telemetry.metrics import Metrics
from ..tenancy.records import KeyRecord, Limits, Tenant
from ..transport.call_record import CallRecord
from .quota import QuotaInterceptor, estimate_request_tokens, peer_scope

__all__ = ["RateLimitInterceptor", "estimate_request_tokens", "peer_scope"]


def _no_cost(model: str, input_tokens: int, output_tokens: int) -> int:
    return 0


class RateLimitInterceptor(QuotaInterceptor):
    """Rate limits only, with the configured keys' limits (see module docstring)."""

    def __init__(
        self,
        backend: QuotaBackend,
        settings: RateLimitSettings,
        keys: Sequence[ApiKeySettings],
        metrics: Metrics | None,
        stream_max_age_s: float,
    ) -> None:
        super().__init__(backend, settings, BudgetSettings(), _no_cost, metrics, stream_max_age_s)
        self._configured = {
            k.id: Tenant(
                KeyRecord(
                    id=k.id,
                    display_name=k.id,
                    secret_sha256=k.key_sha256,
                    limits=Limits(k.rpm, k.tpm, k.max_concurrent_streams),
                    configured=True,
                    owner=k.owner,
                )
            )
            for k in keys
        }

    def tenant(self, record: CallRecord) -> Tenant | None:
        """The record's tenant, else the configured key's limits (no budget)."""
        return record.tenant or self._configured.get(record.key_id)
