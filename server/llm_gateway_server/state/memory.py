"""In-memory backends (the embedded default: one process, nothing to run)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from .base import (
    BUDGET_MARGIN_S,
    WINDOW_S,
    Admission,
    BudgetQuota,
    CacheBackend,
    QuotaBackend,
    QuotaRequest,
    ScopeCount,
    current_window,
    nano_amount,
    token_amount,
)


class MemoryQuotas(QuotaBackend):
    """Rate-limit windows, stream slots and budget counters of each scope in dicts, with the
    semantics of `RedisQuotas` (state/base.py). Single-threaded asyncio makes `admit` and
    `settle` atomic (no await inside). Stale entries (old windows, expired period counters,
    empty stream sets) are swept at most once a window, so anonymous peers and past periods do
    not accumulate."""

    def __init__(self) -> None:
        self._windows: dict[str, list[int]] = {}  # scope -> [window, requests, tokens]
        self._streams: dict[str, dict[str, float]] = {}  # scope -> {stream id: start, unix s}
        self._spend: dict[tuple[str, str], list[float]] = {}  # (scope, counter) -> [nano-USD, expires at]
        self._next_sweep = 0.0

    def _spent(self, scope: str, budget: BudgetQuota, now: float) -> float | None:
        entry = self._spend.get((scope, budget.counter))
        return entry[0] if entry is not None and entry[1] > now else None

    def _open_streams(self, scope: str, now: float, max_age_s: float) -> dict[str, float]:
        streams = self._streams.setdefault(scope, {})
        for old in [k for k, started in streams.items() if now - started > max_age_s]:
            del streams[old]
        return streams

    def _refusal(self, request: QuotaRequest, at: int, exceeded: str, found: ScopeCount) -> Admission:
        window, reset = current_window(request.now)
        counts = tuple(found if i == at else ScopeCount() for i in range(len(request.scopes)))
        return Admission(False, request, window, reset, counts, at, exceeded)

    async def admit(self, request: QuotaRequest) -> Admission:
        now = request.now
        if now >= self._next_sweep:
            self._sweep(now)
        window, reset = current_window(now)
        tokens = token_amount(request.tokens)
        cost = nano_amount(request.cost_nano_usd)
        stream = request.stream_id
        for i, scope in enumerate(request.scopes):
            spent = 0
            if scope.budget is not None:
                found = self._spent(scope.scope, scope.budget, now)
                spent = int(nano_amount(scope.budget.seed_nano_usd) if found is None else found)
                if spent >= scope.budget.limit_nano_usd:
                    return self._refusal(request, i, "budget", ScopeCount(spend_nano_usd=spent))
            if scope.windowed:
                counted = self._windows.get(scope.scope)
                requests, used = (counted[1], counted[2]) if counted is not None and counted[0] == window else (0, 0)
                if scope.rpm is not None and requests + 1 > scope.rpm:
                    return self._refusal(request, i, "requests", ScopeCount(requests, used, spent))
                if scope.tpm is not None and used + tokens > scope.tpm:
                    return self._refusal(request, i, "tokens", ScopeCount(requests, used, spent))
            if (
                scope.max_streams is not None
                and stream
                and len(self._open_streams(scope.scope, now, request.stream_max_age_s)) >= scope.max_streams
            ):
                return self._refusal(request, i, "streams", ScopeCount(spend_nano_usd=spent))
        counts = []
        for scope in request.scopes:
            requests = used = spent = 0
            if scope.budget is not None:
                budget = scope.budget
                entry = self._spend.get((scope.scope, budget.counter))
                if entry is None or entry[1] <= now:
                    expires = math.inf if budget.end_s is None else budget.end_s + BUDGET_MARGIN_S
                    entry = self._spend[(scope.scope, budget.counter)] = [nano_amount(budget.seed_nano_usd), expires]
                entry[0] += cost
                spent = int(entry[0])
            if scope.windowed:
                counted = self._windows.get(scope.scope)
                if counted is None or counted[0] != window:
                    counted = self._windows[scope.scope] = [window, 0, 0]
                counted[1] += 1
                counted[2] += tokens
                requests, used = counted[1], counted[2]
            if scope.max_streams is not None and stream:
                self._streams[scope.scope][stream] = now
            counts.append(ScopeCount(requests, used, spent))
        return Admission(True, request, window, reset, tuple(counts))

    async def settle(self, admission: Admission, tokens: int, cost_nano_usd: int) -> None:
        request = admission.request
        token_delta = token_amount(tokens) - admission.reserved_tokens
        cost_delta = nano_amount(cost_nano_usd) - admission.reserved_nano_usd
        for scope in request.scopes:
            counted = self._windows.get(scope.scope) if scope.windowed and token_delta else None
            if counted is not None and counted[0] == admission.window:
                counted[2] = max(counted[2] + token_delta, 0)
            if admission.holds_streams and scope.max_streams is not None:
                self._streams.get(scope.scope, {}).pop(request.stream_id, None)
            if scope.budget is not None and cost_delta:
                entry = self._spend.get((scope.scope, scope.budget.counter))
                if entry is not None and entry[1] > request.now:
                    entry[0] = max(entry[0] + cost_delta, 0)

    def _sweep(self, now: float) -> None:
        window, _ = current_window(now)
        self._windows = {k: v for k, v in self._windows.items() if v[0] >= window - 1}
        self._spend = {k: v for k, v in self._spend.items() if v[1] > now}
        self._streams = {k: v for k, v in self._streams.items() if v}
        self._next_sweep = now + WINDOW_S


class MemoryCache(CacheBackend):
    """An LRU bounded by entry count and total bytes, with per-entry expiry."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._max_entries = max_entries
        self._max_bytes = max_bytes

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[1]

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        if len(value) > self._max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (time.monotonic() + ttl_s, value)
        self._bytes += len(value)
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self._bytes -= len(value)
