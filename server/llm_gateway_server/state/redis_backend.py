"""Redis backends (redis-py asyncio): shared by every worker and replica.

Check-and-reserve is one Lua script, so a limit of N is exact across processes. Every key of a
scope carries the hash tag `{scope}`, so multi-key scripts also run on Redis Cluster. Every call
is bounded by the socket timeouts and an overall `asyncio.timeout`; failures raise
`BackendUnavailableError` (the caller decides fail-open or fail-closed).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError

from ..config import BreakerSettings
from ..routing.breaker import BreakerState, CircuitBreaker  # pure state machine, shared with deployments
from .base import (
    WINDOW_S,
    BackendUnavailableError,
    CacheBackend,
    RateLimitBackend,
    Reservation,
    current_window,
    token_amount,
)

T = TypeVar("T")
log = structlog.get_logger(__name__)

# KEYS: requests counter, tokens counter. ARGV: rpm (-1: none), tpm (-1: none), tokens, ttl ms.
_ACQUIRE = """
local requests = tonumber(redis.call('GET', KEYS[1]) or '0')
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if rpm >= 0 and requests + 1 > rpm then return {0, requests, used, 'requests'} end
if tpm >= 0 and used + tokens > tpm then return {0, requests, used, 'tokens'} end
requests = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
used = redis.call('INCRBY', KEYS[2], tokens)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {1, requests, used, ''}
"""

# KEYS: the tokens counter. ARGV: delta. Never below zero.
_RECONCILE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if value < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
return value
"""

# KEYS: the open-streams sorted set. ARGV: now ms, max age ms, limit, stream id.
_OPEN_STREAM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


def key(scope: str, *parts: object) -> str:
    """`llmgw:{scope}:part:part` (the braces are the Redis Cluster hash tag)."""
    return ":".join(["llmgw", "{" + scope + "}", *map(str, parts)])


# A frozen or unreachable Redis costs every call its full timeout; after this many failures in a
# row calls skip Redis (BackendUnavailableError at once: fail-open or fail-closed as configured)
# for the cooldown, then one trial call decides.
REDIS_BREAKER = BreakerSettings(consecutive_failures=3, failure_rate=1.0, min_calls=1_000_000, cooldown_s=5.0)
BreakerListener = Callable[[BreakerState], None]


class _Client:
    """One Redis connection pool behind a circuit breaker (`REDIS_BREAKER`); `component` names it
    in logs ("rate_limit", "cache")."""

    def __init__(self, url: str, timeout_s: float, component: str) -> None:
        self.redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
        )
        self._timeout_s = timeout_s * 2
        self._component = component
        self._breaker = CircuitBreaker(REDIS_BREAKER)
        self._state = BreakerState.CLOSED
        self._listeners: list[BreakerListener] = []

    def subscribe(self, listener: BreakerListener) -> None:
        """Calls `listener(new_state)` on every breaker transition."""
        self._listeners.append(listener)

    def _moved(self, now: float) -> None:
        state = self._breaker.state(now)
        if state is self._state:
            return
        log.warning("state_backend_breaker", component=self._component, old=self._state.value, new=state.value)
        self._state = state
        for listener in self._listeners:
            listener(state)

    async def run(self, call: Awaitable[T]) -> T:
        """Awaits one Redis call within the timeout.

        Raises:
            BackendUnavailableError: Redis failed or timed out, or the breaker is open (then the
                call is not sent at all).
        """
        now = time.monotonic()
        if not self._breaker.try_acquire(now):
            if inspect.iscoroutine(call):
                call.close()  # never sent: no "coroutine was never awaited"
            self._moved(now)
            raise BackendUnavailableError(f"redis: skipped for up to {REDIS_BREAKER.cooldown_s:g}s after failures")
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await call
        except (RedisError, OSError, TimeoutError) as exc:
            self._breaker.record(time.monotonic(), success=False)
            self._moved(time.monotonic())
            raise BackendUnavailableError(f"redis: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # cancelled: no outcome, but a half-open trial slot to give back
            self._breaker.release_trial(time.monotonic())
            raise
        self._breaker.record(time.monotonic(), success=True)
        self._moved(time.monotonic())
        return result


class RedisRateLimits(RateLimitBackend):
    """Rate limits in Redis (see module docstring)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._client = _Client(url, timeout_s, "rate_limit")
        self.subscribe = self._client.subscribe
        self._acquire = self._client.redis.register_script(_ACQUIRE)
        self._reconcile = self._client.redis.register_script(_RECONCILE)
        self._open = self._client.redis.register_script(_OPEN_STREAM)

    async def acquire(self, scope: str, rpm: int | None, tpm: int | None, tokens: int) -> Reservation:
        tokens = token_amount(tokens)
        window, reset = current_window()
        keys = [key(scope, "req", window), key(scope, "tok", window)]
        args = [-1 if rpm is None else rpm, -1 if tpm is None else tpm, tokens, int(WINDOW_S * 2 * 1000)]
        result: list[Any] = await self._client.run(self._acquire(keys=keys, args=args))
        allowed, requests, used, exceeded = int(result[0]), int(result[1]), int(result[2]), result[3]
        exceeded = exceeded.decode() if isinstance(exceeded, bytes) else str(exceeded)
        return Reservation(bool(allowed), exceeded, requests, used, window, reset, tokens if allowed else 0)

    async def reconcile(self, scope: str, reservation: Reservation, actual_tokens: int) -> None:
        delta = token_amount(actual_tokens) - token_amount(reservation.reserved_tokens)
        if delta:
            await self._client.run(self._reconcile(keys=[key(scope, "tok", reservation.window)], args=[delta]))

    async def open_stream(self, scope: str, stream_id: str, limit: int, max_age_s: float) -> bool:
        now_ms = int(time.time() * 1000)
        args: list[str | int] = [now_ms, int(max_age_s * 1000), limit, stream_id]
        return bool(await self._client.run(self._open(keys=[key(scope, "streams")], args=args)))

    async def close_stream(self, scope: str, stream_id: str) -> None:
        await self._client.run(self._client.redis.zrem(key(scope, "streams"), stream_id))

    async def aclose(self) -> None:
        await self._client.redis.aclose()


class RedisCache(CacheBackend):
    """The response cache in Redis: GET / SET with PX expiry."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._client = _Client(url, timeout_s, "cache")
        self.subscribe = self._client.subscribe

    async def get(self, cache_key: str) -> bytes | None:
        value = await self._client.run(self._client.redis.get(cache_key))
        return value if isinstance(value, bytes) else None

    async def set(self, cache_key: str, value: bytes, ttl_s: int) -> None:
        await self._client.run(self._client.redis.set(cache_key, value, px=ttl_s * 1000))

    async def aclose(self) -> None:
        await self._client.redis.aclose()
