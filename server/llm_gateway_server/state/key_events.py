"""Key changes on Redis pub/sub, so every replica's key cache drops a changed key at once.

One channel, `llmgw:key-events`, carries JSON messages: `{"key": id}` (a key was created, updated,
rotated or revoked), `{"team": id}` (a team changed) and `{"all": true}` (anything may have
changed). `KeyEvents` applies a change to the local `KeyCache` first, then publishes it (bounded
by the Redis timeout; a failed publish is logged and the change reaches other replicas within the
cache's TTL instead). A listener task applies every message from other replicas (and its own echo,
which is harmless).

The listener never blocks the hot path: it runs as its own task, every Redis call is bounded, and
a lost connection is retried with exponential backoff (0.1 s doubling to `max_backoff_s`, with
jitter). A silent connection (a frozen Redis) is detected by PINGs: no answer within
`ping_interval_s + dead_after_s` counts as lost. On every (re)subscription the cache is told that
anything may have changed (`KeyCache.invalidate(None)`): messages may have been missed meanwhile.
Without Redis (`redis_url` None) changes apply locally only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from typing import Any

import redis.asyncio as redis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..tenancy.key_cache import KeyCache

CHANNEL = "llmgw:key-events"
log = structlog.get_logger(__name__)
_MIN_BACKOFF_S = 0.1


class KeyEvents:
    """Publishes key changes and applies those of other replicas (see module docstring).

    Args:
        cache: the process's key cache.
        redis_url: Redis (`Settings.redis_url`); None: changes apply to this process only.
        timeout_s: bound on one Redis call (connect, publish, subscribe), seconds.
        channel: the pub/sub channel.
        ping_interval_s: a PING is sent after this long without a message, seconds.
        dead_after_s: the connection counts as lost this long after an unanswered PING was due,
            seconds (default: 4 × `timeout_s`, at least 1 s).
        max_backoff_s: longest wait between reconnection attempts, seconds.
    """

    def __init__(
        self,
        cache: KeyCache,
        redis_url: str | None,
        *,
        timeout_s: float = 0.25,
        channel: str = CHANNEL,
        ping_interval_s: float = 5.0,
        dead_after_s: float | None = None,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._cache = cache
        self._channel = channel
        self._timeout_s = timeout_s
        self._ping_interval_s = ping_interval_s
        self._dead_after_s = dead_after_s if dead_after_s is not None else max(1.0, 4 * timeout_s)
        self._max_backoff_s = max_backoff_s
        self._redis: redis.Redis | None = (
            redis.Redis.from_url(
                redis_url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),  # reconnection is ours: a reconnect must invalidate
            )
            if redis_url
            else None
        )
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    @property
    def subscribed(self) -> bool:
        """Whether the listener is subscribed right now (False without Redis)."""
        return self._subscribed.is_set()

    async def start(self) -> None:
        """Starts the listener (without Redis: nothing); returns at once, connected or not."""
        if self._redis is not None and self._task is None:
            self._task = asyncio.create_task(self._listen(self._redis), name="key-events")

    async def wait_subscribed(self, timeout_s: float) -> bool:
        """Waits up to `timeout_s` seconds for the listener to be subscribed; whether it is."""
        if self._redis is None:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._subscribed.wait()
        return self.subscribed

    async def aclose(self) -> None:
        """Stops the listener and closes the Redis connections. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self._timeout_s):
                    await self._redis.aclose()

    # --- publishing ------------------------------------------------------------------------

    async def key_changed(self, key_id: str) -> bool:
        """A key was updated, rotated or revoked: dropped from this process's cache at once, and
        published. Returns whether it was published (False: without Redis, or Redis failed)."""
        self._cache.invalidate(key_id)
        return await self._publish({"key": key_id})

    async def key_created(self, key_id: str) -> bool:
        """A key was created: auth applies from now on, here and (published) everywhere.
        Returns whether it was published."""
        self._cache.note_key_created()
        self._cache.invalidate(key_id)
        return await self._publish({"key": key_id})

    async def team_changed(self, team_id: str) -> bool:
        """A team changed: its keys are re-read before their next use, here and (published)
        everywhere. Returns whether it was published."""
        self._cache.invalidate_team(team_id)
        return await self._publish({"team": team_id})

    async def everything_changed(self) -> bool:
        """Anything may have changed: every cached key is re-read before its next use, here and
        (published) everywhere. Returns whether it was published."""
        self._cache.invalidate(None)
        return await self._publish({"all": True})

    async def _publish(self, message: dict[str, Any]) -> bool:
        if self._redis is None:
            return False
        try:
            async with asyncio.timeout(self._timeout_s * 2):
                await self._redis.publish(self._channel, json.dumps(message))
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning(
                "key_event_not_published",
                change=message,
                error=f"{type(exc).__name__}: {exc}",
                note="other replicas see the change within the key cache TTL",
            )
            return False
        return True

    # --- listening -------------------------------------------------------------------------

    def apply(self, data: bytes | str) -> None:
        """Applies one message's change to the cache (anything unreadable counts as `all`)."""
        try:
            message = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            message = None
        if isinstance(message, dict) and isinstance(message.get("key"), str):
            self._cache.invalidate(message["key"])
        elif isinstance(message, dict) and isinstance(message.get("team"), str):
            self._cache.invalidate_team(message["team"])
        else:
            if not (isinstance(message, dict) and message.get("all") is True):
                log.warning("key_event_unreadable", note="treated as: anything may have changed")
            self._cache.invalidate(None)

    async def _listen(self, client: redis.Redis) -> None:
        """Subscribes, applies messages, and reconnects with backoff until cancelled."""
        backoff = _MIN_BACKOFF_S
        failures = 0
        while True:
            pubsub: Any = client.pubsub()  # redis-py PubSub (untyped)
            try:
                await self._consume(pubsub)
            except Exception as exc:  # noqa: BLE001 - Redis errors, timeouts, anything unexpected: reconnect
                was_subscribed = self.subscribed
                self._subscribed.clear()
                failures = 1 if was_subscribed else failures + 1
                if was_subscribed:
                    backoff = _MIN_BACKOFF_S
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "key_events_disconnected",
                        error=f"{type(exc).__name__}: {exc}",
                        attempts=failures,
                        retry_in_s=round(backoff, 2),
                        note="key changes reach this replica within the key cache TTL until reconnected",
                    )
            finally:
                self._subscribed.clear()
                with contextlib.suppress(RedisError, OSError, TimeoutError, RuntimeError):
                    async with asyncio.timeout(self._timeout_s):
                        await pubsub.aclose()
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self._max_backoff_s)

    async def _consume(self, pubsub: Any) -> None:
        """One connection's life: subscribe, then apply messages until it fails.

        Raises:
            RedisError, OSError, TimeoutError: the connection failed or went silent.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout_s * 2):
            await pubsub.subscribe(self._channel)
        last_seen = loop.time()
        pinged = False
        poll_s = min(0.5, self._ping_interval_s)
        while True:
            message = await pubsub.get_message(timeout=poll_s)
            now = loop.time()
            if message is not None:
                last_seen, pinged = now, False
                kind = message.get("type")
                if kind == "subscribe":
                    self._cache.invalidate(None)  # messages may have been missed until now
                    self._subscribed.set()
                    log.info("key_events_subscribed", channel=self._channel)
                elif kind == "message":
                    self.apply(message["data"])
                continue
            silent = now - last_seen
            if silent >= self._ping_interval_s + self._dead_after_s:
                raise TimeoutError(f"no answer from Redis for {silent:.1f}s")
            if silent >= self._ping_interval_s and not pinged:
                async with asyncio.timeout(self._timeout_s):
                    await pubsub.ping()
                pinged = True
