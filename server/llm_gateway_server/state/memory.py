"""In-memory backends (the embedded default: one process, nothing to run)."""

from __future__ import annotations

import time
from collections import OrderedDict

from .base import CacheBackend, RateLimitBackend, Reservation, current_window, token_amount


class MemoryRateLimits(RateLimitBackend):
    """Per-scope counters of the current window, and open streams, in a dict. Single-threaded
    asyncio makes each method atomic (no await inside)."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, int, int]] = {}  # scope -> (window, requests, tokens)
        self._streams: dict[str, dict[str, float]] = {}

    async def acquire(self, scope: str, rpm: int | None, tpm: int | None, tokens: int) -> Reservation:
        tokens = token_amount(tokens)
        window, reset = current_window()
        seen_window, requests, used = self._counts.get(scope, (window, 0, 0))
        if seen_window != window:
            requests, used = 0, 0
        exceeded = "requests" if rpm is not None and requests + 1 > rpm else ""
        if not exceeded and tpm is not None and used + tokens > tpm:
            exceeded = "tokens"
        if exceeded:
            return Reservation(False, exceeded, requests, used, window, reset, 0)
        self._counts[scope] = (window, requests + 1, used + tokens)
        return Reservation(True, "", requests + 1, used + tokens, window, reset, tokens)

    async def reconcile(self, scope: str, reservation: Reservation, actual_tokens: int) -> None:
        window, requests, used = self._counts.get(scope, (reservation.window, 0, 0))
        if window == reservation.window:
            refunded = used - token_amount(reservation.reserved_tokens) + token_amount(actual_tokens)
            self._counts[scope] = (window, requests, max(refunded, 0))

    async def open_stream(self, scope: str, stream_id: str, limit: int, max_age_s: float) -> bool:
        now = time.monotonic()
        streams = self._streams.setdefault(scope, {})
        for old in [k for k, t in streams.items() if now - t > max_age_s]:
            del streams[old]
        if len(streams) >= limit:
            return False
        streams[stream_id] = now
        return True

    async def close_stream(self, scope: str, stream_id: str) -> None:
        self._streams.get(scope, {}).pop(stream_id, None)


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
