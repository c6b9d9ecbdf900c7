"""Redis backends (redis-py asyncio): shared by every worker and replica.

Check-and-reserve of quotas is one Lua script before a call and one after, so a limit of N (and
a budget) is exact across processes. Every key of a call carries the hash tag of its tenant root
(`{teams/…}`, `{keys/…}` or `{peer:…}`), so the scripts also run on Redis Cluster. Every call
is bounded by the socket timeouts and an overall `asyncio.timeout`; failures raise
`BackendUnavailableError` (the caller decides fail-open or fail-closed).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as redis
import structlog
from redis.exceptions import NoScriptError, RedisError

from ..config import BreakerSettings
from ..routing.breaker import BreakerState, CircuitBreaker  # pure state machine, shared with deployments
from .base import (
    BUDGET_MARGIN_S,
    WINDOW_S,
    Admission,
    BackendUnavailableError,
    CacheBackend,
    QuotaBackend,
    QuotaRequest,
    ScopeCount,
    current_window,
    nano_amount,
    token_amount,
)

T = TypeVar("T")
log = structlog.get_logger(__name__)

# Counters of scope i (1-based): KEYS[3i-2] the window hash (fields r: requests, t: tokens),
# KEYS[3i-1] the open-streams sorted set (member: stream id, score: start ms), KEYS[3i] the
# budget counter (nano-USD). ARGV[1]: "now-ms max-age-ms window-ttl-ms tokens cost scopes";
# ARGV[2]: the stream id ('' for none); ARGV[2+i]: scope i's "rpm tpm max-streams budget-limit
# seed expires-ms" (-1: no such limit; expires -1: never). Few arguments: each costs the client
# its encoding (about a microsecond), while Lua splits a string for next to nothing.
# Amounts stay the decimal strings they came as (INCRBY takes them as 64-bit integers); Lua
# compares them as doubles, exact below 2^53.
# Returns {1, requests, tokens, spend, ... per scope} or {0, refusing scope, what, r, t, s}.
_ADMIT = """
local six = '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$'
local now, age, ttl, tokens, cost, n = string.match(ARGV[1], six)
now, n = tonumber(now), tonumber(n)
local stream, want = ARGV[2], tonumber(tokens)
local scopes = {}
for i = 1, n do
  local rpm, tpm, streams, limit, seed, expires = string.match(ARGV[2 + i], six)
  scopes[i] = {tonumber(rpm), tonumber(tpm), tonumber(streams), tonumber(limit), seed, tonumber(expires)}
end
for i = 1, n do
  local rpm, tpm, streams, limit = scopes[i][1], scopes[i][2], scopes[i][3], scopes[i][4]
  local spent = 0
  if limit >= 0 then
    spent = tonumber(redis.call('GET', KEYS[3 * i]) or scopes[i][5])
    if spent >= limit then return {0, i, 'budget', 0, 0, spent} end
  end
  if rpm >= 0 or tpm >= 0 then
    local counts = redis.call('HMGET', KEYS[3 * i - 2], 'r', 't')
    local requests, used = tonumber(counts[1] or '0'), tonumber(counts[2] or '0')
    if rpm >= 0 and requests + 1 > rpm then return {0, i, 'requests', requests, used, spent} end
    if tpm >= 0 and used + want > tpm then return {0, i, 'tokens', requests, used, spent} end
  end
  if streams >= 0 and stream ~= '' then
    redis.call('ZREMRANGEBYSCORE', KEYS[3 * i - 1], '-inf', now - tonumber(age))
    if redis.call('ZCARD', KEYS[3 * i - 1]) >= streams then return {0, i, 'streams', 0, 0, spent} end
  end
end
local out = {1}
for i = 1, n do
  local requests, used, spent = 0, 0, 0
  if scopes[i][4] >= 0 then
    local counter = KEYS[3 * i]
    if redis.call('EXISTS', counter) == 0 then
      redis.call('SET', counter, scopes[i][5])
      -- never in the past (a call admitted just after its period's end still counts exactly)
      local expires = scopes[i][6]
      if expires >= 0 then redis.call('PEXPIREAT', counter, math.max(expires, now + 60000)) end
    end
    spent = redis.call('INCRBY', counter, cost)
  end
  if scopes[i][1] >= 0 or scopes[i][2] >= 0 then
    requests = redis.call('HINCRBY', KEYS[3 * i - 2], 'r', 1)
    used = redis.call('HINCRBY', KEYS[3 * i - 2], 't', tokens)
    redis.call('PEXPIRE', KEYS[3 * i - 2], ttl)
  end
  if scopes[i][3] >= 0 and stream ~= '' then
    redis.call('ZADD', KEYS[3 * i - 1], now, stream)
    redis.call('PEXPIRE', KEYS[3 * i - 1], age)
  end
  out[#out + 1] = requests
  out[#out + 1] = used
  out[#out + 1] = spent
end
return out
"""

# KEYS as for _ADMIT. ARGV[1]: "token-delta cost-delta scopes"; ARGV[2]: the stream id ('' for
# none); ARGV[3]: three flags per scope ('1' / '0'): windowed, holds a stream slot, budgeted.
# Counters that no longer exist are left alone; none goes below zero.
_SETTLE = """
local tokens, cost, n = string.match(ARGV[1], '^(%S+) (%S+) (%S+)$')
local stream, flags = ARGV[2], ARGV[3]
for i = 1, tonumber(n) do
  local windowed, slot, budgeted = string.byte(flags, 3 * i - 2, 3 * i)
  if windowed == 49 and tokens ~= '0' and redis.call('EXISTS', KEYS[3 * i - 2]) == 1 then
    if redis.call('HINCRBY', KEYS[3 * i - 2], 't', tokens) < 0 then redis.call('HSET', KEYS[3 * i - 2], 't', 0) end
  end
  if slot == 49 then redis.call('ZREM', KEYS[3 * i - 1], stream) end
  if budgeted == 49 and cost ~= '0' and redis.call('EXISTS', KEYS[3 * i]) == 1 then
    if redis.call('INCRBY', KEYS[3 * i], cost) < 0 then redis.call('SET', KEYS[3 * i], 0, 'KEEPTTL') end
  end
end
return 1
"""


def key(tag: str, *parts: object) -> str:
    """`llmgw:{tag}:part:part` (the braces are the Redis Cluster hash tag: every key of one tag is
    in one slot)."""
    return ":".join(["llmgw", "{" + tag + "}", *map(str, parts)])


# A frozen or unreachable Redis costs every call its full timeout; after this many failures in a
# row calls skip Redis (BackendUnavailableError at once: fail-open or fail-closed as configured)
# for the cooldown, then one trial call decides.
REDIS_BREAKER = BreakerSettings(consecutive_failures=3, failure_rate=1.0, min_calls=1_000_000, cooldown_s=5.0)
BreakerListener = Callable[[BreakerState], None]


class _Script:
    """A Lua script and its SHA-1 (what EVALSHA names it by)."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()


def _resp(*parts: bytes) -> bytes:
    """A command as the Redis protocol (RESP) sends it: an array of bulk strings."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out += (b"$%d\r\n" % len(part), part, b"\r\n")
    return b"".join(out)


# Calls in flight per pool, hence connections: a call beyond them waits for a free one (within
# its timeout). redis-py's pool alone refuses a call beyond its size (MaxConnectionsError).
MAX_CONNECTIONS = 64


class _Client:
    """One Redis connection pool behind a circuit breaker (`REDIS_BREAKER`); `component` names it
    in logs ("rate_limit", "cache").

    Each call is bounded by one `asyncio.timeout` (twice `timeout_s`: waiting for a free
    connection, connecting — itself bounded by `timeout_s` — writing and reading); a call cut
    by it has its connection closed by redis-py. No per-read and per-write socket timeouts: they
    would cost every call two more timers and a task (`asyncio.wait_for` around each write), about
    a fifth of the client's CPU per round trip (bench/NOTES.md). At most `MAX_CONNECTIONS` calls
    (connections) at once; calls beyond wait (a semaphore: no timer when one is free)."""

    def __init__(self, url: str, timeout_s: float, component: str) -> None:
        pool = redis.ConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            socket_timeout=None,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
        )
        self.redis = redis.Redis(connection_pool=pool)
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
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

    async def evalsha(self, script: _Script, keys: Sequence[str], args: Sequence[str]) -> Any:
        """EVALSHA of `script` (loaded with SCRIPT LOAD on NOSCRIPT, then run again) in one round
        trip on a pooled connection, within `run`'s bounds.

        The command is packed here from strings (redis-py's generic `execute_command` packs each
        argument through its encoder and runs retry and observability hooks: about 300 Python
        calls a round trip, a third of what the quota check costs the client; bench/NOTES.md).
        redis-py's connection still reads and parses the reply and closes itself on any error
        or cancellation mid-command.

        Raises:
            BackendUnavailableError: as `run`.
        """
        encoded = [k.encode() for k in keys] + [a.encode() for a in args]
        command = _resp(b"EVALSHA", script.sha, b"%d" % len(keys), *encoded)
        return await self.run(self._evalsha(script, command))

    async def _evalsha(self, script: _Script, command: bytes) -> Any:
        pool = self.redis.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        try:
            await connection.send_packed_command(command, check_health=False)
            try:
                return await connection.read_response()
            except NoScriptError:  # a restarted or flushed Redis: load it, run again
                await connection.send_packed_command(_resp(b"SCRIPT", b"LOAD", script.source), check_health=False)
                await connection.read_response()
                await connection.send_packed_command(command, check_health=False)
                return await connection.read_response()
        finally:
            await pool.release(connection)

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
            async with asyncio.timeout(self._timeout_s), self._slots:
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


class RedisQuotas(QuotaBackend):
    """Quotas in Redis (see state/base.py): `admit` and `settle` are one script call each
    (EVALSHA; the script is loaded on NOSCRIPT), every counter of a call under the hash tag of
    its tenant root (`llmgw:{tag}:{scope}:win:{window}`, `…:streams`, `…:spend:{period}:{start}`),
    so the check of a key and its team is atomic and exact across workers and replicas, and
    runs on Redis Cluster."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._client = _Client(url, timeout_s, "rate_limit")
        self.subscribe = self._client.subscribe
        self._admit = _Script(_ADMIT)
        self._settle = _Script(_SETTLE)

    async def admit(self, request: QuotaRequest) -> Admission:
        window, reset = current_window(request.now)
        tokens = token_amount(request.tokens)
        cost = nano_amount(request.cost_nano_usd)
        max_age_ms = int(request.stream_max_age_s * 1000)
        now_ms = int(request.now * 1000)
        keys: list[str] = []
        args = [f"{now_ms} {max_age_ms} {WINDOW_S * 2000} {tokens} {cost} {len(request.scopes)}", request.stream_id]
        tag = request.tag
        for scope in request.scopes:
            budget = scope.budget
            counter = budget.counter if budget is not None else "spend"
            keys += (
                key(tag, scope.scope, "win", window),
                key(tag, scope.scope, "streams"),
                key(tag, scope.scope, counter),
            )
            limits = f"{_none(scope.rpm)} {_none(scope.tpm)} {_none(scope.max_streams)}"
            if budget is None:
                args.append(f"{limits} -1 0 -1")
            else:
                expires = -1 if budget.end_s is None else (budget.end_s + BUDGET_MARGIN_S) * 1000
                args.append(f"{limits} {budget.limit_nano_usd} {nano_amount(budget.seed_nano_usd)} {expires}")
        result: list[Any] = await self._client.evalsha(self._admit, keys, args)
        if int(result[0]):
            counts = tuple(
                ScopeCount(int(result[j]), int(result[j + 1]), int(result[j + 2])) for j in range(1, len(result), 3)
            )
            return Admission(True, request, window, reset, counts, keys=tuple(keys))
        at, exceeded = int(result[1]) - 1, result[2]
        exceeded = exceeded.decode() if isinstance(exceeded, bytes) else str(exceeded)
        found = ScopeCount(int(result[3]), int(result[4]), int(result[5]))
        counts = tuple(found if i == at else ScopeCount() for i in range(len(request.scopes)))
        return Admission(False, request, window, reset, counts, at, exceeded, keys=tuple(keys))

    async def settle(self, admission: Admission, tokens: int, cost_nano_usd: int) -> None:
        request = admission.request
        token_delta = token_amount(tokens) - admission.reserved_tokens
        cost_delta = nano_amount(cost_nano_usd) - admission.reserved_nano_usd
        streams = admission.holds_streams
        if not token_delta and not cost_delta and not streams:
            return
        keys = admission.keys
        flags = "".join(
            ("1" if scope.windowed else "0")
            + ("1" if streams and scope.max_streams is not None else "0")
            + ("1" if scope.budget is not None else "0")
            for scope in request.scopes
        )
        args = [f"{token_delta} {cost_delta} {len(request.scopes)}", request.stream_id if streams else "", flags]
        await self._client.evalsha(self._settle, keys, args)

    async def aclose(self) -> None:
        await self._client.redis.aclose(close_connection_pool=True)


def _none(limit: int | None) -> int:
    """A limit as the scripts take it: -1 for none."""
    return -1 if limit is None else limit


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
        await self._client.redis.aclose(close_connection_pool=True)
