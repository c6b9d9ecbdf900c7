"""The in-process key cache: who a presented secret belongs to, without the database on the hot path.

A secret is looked up by its SHA-256 hex digest (`hash_key`; the digest found is compared again in
constant time). The answer is a `Tenant`: the key record, its team, and the ledger spend of each
in its current budget period (`SpendSeed`, to seed budget counters).

- **Configured keys** (the YAML file's `auth.keys`) are always known, with no database at all,
  and take precedence: a database key with the id of a configured key is refused (never shadows
  it). Their spend seeds are read once per budget period (prefetched by `start`; while the
  database is down they start from 0 with a warning and are read again later).
- **Database keys** are cached for `ttl_s` seconds; a key in use is re-read in the background
  once half its TTL has passed, so a busy key never waits on the database. Unknown secrets are
  remembered as unknown for `negative_ttl_s`. At most `max_entries` digests are held, known and
  unknown together (unknown ones dropped first, then the least recently used keys). One database
  lookup runs per digest at a time (single flight), bounded by the store's operation timeout (and
  `asyncio.timeout` on top).
- **Database unreachable** (`StoreUnavailableError`, timeout, or any store failure): a cached key
  keeps working up to `stale_s` seconds past its TTL; an unknown secret is UNAVAILABLE /
  KEY_STORE_UNAVAILABLE. After a failure and until a database call succeeds, lookups do not wait
  on the database: stale entries are served at once, unknown secrets refused at once, and one
  lookup every `_DOWN_BACKOFF_S` probes it.
- **Checks at every resolve**: a rotated-away secret works until `previous_secret_expire_time`;
  then revoked → UNAUTHENTICATED API_KEY_REVOKED, disabled → PERMISSION_DENIED API_KEY_DISABLED,
  expired → UNAUTHENTICATED API_KEY_EXPIRED.
- **Invalidation**: `invalidate(key_id)` drops a key at once (revocation wins even while the
  database is down); `invalidate(None)` and `invalidate_team` make entries re-read before their
  next use (served stale only if the database cannot be reached). `state/key_events.py` calls
  them on Redis pub/sub messages, so every replica sees a change at once; without Redis, within
  `ttl_s`.
- **When auth applies**: `keys_exist()`: configured keys, or `Store.count_keys() > 0` (cached,
  re-read after `ttl_s` and after any invalidation).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from ..config import ApiKeySettings, KeyCacheSettings
from ..errors import (
    GatewayError,
    api_key_disabled,
    api_key_expired,
    api_key_invalid,
    api_key_revoked,
    key_store_unavailable,
)
from ..store.base import ScopeKind, Store, StoreUnavailableError
from .records import Budget, BudgetPeriod, KeyRecord, Limits, SpendSeed, Tenant, usd_to_nano

log = structlog.get_logger(__name__)
T = TypeVar("T")

# After a failed database call, the database counts as down until a call succeeds: stale entries
# are served and unknown secrets refused at once, and one lookup probes the database again every
# this many seconds (instead of every call waiting for the timeout).
_DOWN_BACKOFF_S = 1.0
# A cached key in use is re-read in the background after this fraction of its TTL.
_REFRESH_AHEAD = 0.5


def hash_key(secret: str) -> str:
    """The SHA-256 hex digest (64 lower-case hex chars) under which a secret is stored."""
    return hashlib.sha256(secret.encode()).hexdigest()


def configured_key_record(key: ApiKeySettings) -> KeyRecord:
    """A YAML key (`auth.keys[]`) as a `KeyRecord` (`configured=True`).

    `allowed_models` containing "*" becomes () (every model); the budget's USD become nano-USD;
    `expires_at` becomes UTC (a naive time is taken as local time).
    """
    budget = (
        Budget(usd_to_nano(key.budget.limit_usd), BudgetPeriod(key.budget.period)) if key.budget is not None else None
    )
    return KeyRecord(
        id=key.id,
        display_name=key.id,
        secret_sha256=key.key_sha256,
        allowed_models=() if "*" in key.allowed_models else tuple(key.allowed_models),
        limits=Limits(key.rpm, key.tpm, key.max_concurrent_streams),
        budget=budget,
        expire_time=key.expires_at.astimezone(UTC) if key.expires_at is not None else None,
        disabled=key.disabled,
        configured=True,
        owner=key.owner,
    )


def check_key(key: KeyRecord, digest: str, now: datetime) -> None:
    """Whether `key` may be used with the secret whose digest is `digest`, at `now` (UTC).

    Raises:
        GatewayError: API_KEY_INVALID (the digest is neither the current secret nor a previous one
            still in its grace period), API_KEY_REVOKED, API_KEY_DISABLED or API_KEY_EXPIRED.
    """
    if not hmac.compare_digest(key.secret_sha256, digest):
        previous = key.previous_secret_sha256
        if not previous or not hmac.compare_digest(previous, digest):
            raise api_key_invalid("the API key is not valid")
        until = key.previous_secret_expire_time
        if until is None or until <= now:
            raise api_key_invalid("the API key was replaced by a rotation and its grace period has ended")
    if key.revoke_time is not None:
        raise api_key_revoked(key.id)
    if key.disabled:
        raise api_key_disabled(key.id)
    if key.expire_time is not None and key.expire_time <= now:
        raise api_key_expired(key.id, key.expire_time.isoformat())


def _usable(key: KeyRecord, now: datetime) -> bool:
    """Not revoked, disabled or expired (only usable keys need spend seeds)."""
    expired = key.expire_time is not None and key.expire_time <= now
    return key.revoke_time is None and not key.disabled and not expired


@dataclass(slots=True)
class _Entry:
    """A cached key. Monotonic deadlines, seconds."""

    tenant: Tenant
    fresh_until: float
    stale_until: float
    refresh_after: float


@dataclass(slots=True)
class _Configured:
    """A configured key and its tenant (with its spend seed once read).

    `seed_until`: wall-clock time (epoch seconds) the seed's budget period ends (inf for a
    lifetime budget; 0 until read). `reread_at`: monotonic time the seed is read again.
    """

    record: KeyRecord
    tenant: Tenant
    seed_until: float = 0.0
    reread_at: float = 0.0


class KeyCache:
    """Resolves presented secrets to tenants (see module docstring).

    Args:
        store: the control plane's store; None: configured keys only (every other secret is
            API_KEY_INVALID, and `keys_exist` is True only with configured keys).
        configured: the YAML file's keys.
        settings: TTLs and bounds (`KeyCacheSettings`).
        timeout_s: bound on one lookup (all its database calls together), seconds: the store's
            operation timeout (`StoreSettings.timeout_s`).
    """

    def __init__(
        self,
        store: Store | None,
        configured: Sequence[ApiKeySettings],
        settings: KeyCacheSettings,
        *,
        timeout_s: float = 2.0,
    ) -> None:
        self._store = store
        self._settings = settings
        self._timeout_s = timeout_s
        self._configured: dict[str, _Configured] = {}
        for key in configured:
            record = configured_key_record(key)
            self._configured[record.secret_sha256] = _Configured(record, Tenant(record))
        self._configured_ids = frozenset(c.record.id for c in self._configured.values())
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._unknown: OrderedDict[str, float] = OrderedDict()  # digest → monotonic expiry, oldest first
        self._digests_by_key: dict[str, set[str]] = {}
        self._inflight: dict[str, asyncio.Task[Tenant | None]] = {}
        self._seeding: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._generation = 0
        self._down = False
        self._probe_at = 0.0
        self._count: bool | None = None
        self._count_until = 0.0
        self._count_generation = 0
        self._count_task: asyncio.Task[bool] | None = None
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts reading, in the background, the spend seeds of configured keys with budgets and
        whether database keys exist; returns at once (never waits on the database)."""
        if self._store is None:
            return
        now = time.monotonic()
        for configured in self._configured.values():
            if configured.record.budget is not None:
                self._seed_behind(configured, now)
        if not self._configured:
            self._count_behind()

    async def aclose(self) -> None:
        """Cancels background reads and lookups in flight; waits for them to end. Idempotent."""
        self._closed = True
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._background.clear()

    # --- what the data plane asks -----------------------------------------------------------

    @property
    def configured_keys(self) -> tuple[KeyRecord, ...]:
        """The configured keys as records (read-only through the admin API)."""
        return tuple(c.record for c in self._configured.values())

    def is_configured(self, key_id: str) -> bool:
        """Whether `key_id` is a configured key's id (the admin API may not change it)."""
        return key_id in self._configured_ids

    async def resolve(self, secret: str) -> Tenant:
        """The tenant of a presented secret, checked for use now.

        Waits on the database only for a secret not cached (or past its TTL), at most
        `timeout_s`.

        Raises:
            GatewayError: UNAUTHENTICATED API_KEY_INVALID (unknown secret, or a rotated-away one
                past its grace period), API_KEY_REVOKED or API_KEY_EXPIRED; PERMISSION_DENIED
                API_KEY_DISABLED; UNAVAILABLE KEY_STORE_UNAVAILABLE (not cached and the database
                did not answer in time).
        """
        digest = hash_key(secret)
        configured = self._configured.get(digest)
        if configured is not None:
            check_key(configured.record, digest, datetime.now(UTC))
            return await self._configured_tenant(configured)
        tenant = await self._lookup(digest)
        if tenant is None:
            raise api_key_invalid("the API key is not valid")
        check_key(tenant.key, digest, datetime.now(UTC))
        return tenant

    async def is_key(self, secret: str) -> bool:
        """Whether `secret` is a data-plane key that works now (configured or in the database);
        False for anything `resolve` refuses, the database being unreachable included."""
        try:
            await self.resolve(secret)
        except GatewayError:
            return False
        return True

    async def keys_exist(self) -> bool:
        """Whether any key exists (configured, or ever created in the database: revoked keys count): then every
        data-plane call needs one.

        The database's answer is cached for `ttl_s` and re-read after any invalidation; a cached
        True is re-read in the background, a cached False (or none) is re-read before answering
        (at most `timeout_s`). Database unreachable: the last answer, or True if there was none.
        """
        if self._configured:
            return True
        if self._store is None:
            return False
        known = self._count
        now = time.monotonic()
        if known is not None and now < self._count_until:
            return known
        if known is True:
            self._count_behind()
            return True
        if not self._may_probe(now):
            return True if known is None else known
        try:
            exists = await self._wait(self._count_behind(), "count_keys")
        except StoreUnavailableError:
            return True if self._count is None else self._count
        return exists or self._count is True  # a key created during the read counts

    # --- what the control plane tells it ----------------------------------------------------

    def invalidate(self, key_id: str | None) -> None:
        """Forgets what is cached about a key, or about every key.

        Args:
            key_id: the key changed (updated, rotated, revoked, created): its cached entries are
                dropped at once, so its next use reads the database (and fails UNAVAILABLE while
                the database is down: a revocation always wins). None: anything may have changed
                (a team changed, or change messages may have been missed): every cached database
                key is re-read before its next use, and served stale only if the database cannot
                be reached. Either way unknown secrets are forgotten and `keys_exist` re-reads.
                Configured keys are not affected.
        """
        self._generation += 1
        self._count_generation += 1
        self._inflight.clear()
        self._count_until = 0.0
        self._unknown.clear()
        if key_id is None:
            for entry in self._entries.values():
                entry.fresh_until = entry.refresh_after = 0.0
            return
        for digest in self._digests_by_key.pop(key_id, set()):
            self._entries.pop(digest, None)

    def invalidate_team(self, team_id: str) -> None:
        """A team changed (allowed models, limits, budget): its keys are re-read before their next
        use (served stale only if the database cannot be reached); unknown secrets forgotten."""
        self._generation += 1
        self._inflight.clear()
        self._unknown.clear()
        for entry in self._entries.values():
            if entry.tenant.key.team_id == team_id:
                entry.fresh_until = entry.refresh_after = 0.0

    def note_key_created(self) -> None:
        """A key was created here: auth applies from now on (`keys_exist` is True without asking
        the database), and unknown secrets are forgotten (the new one may be among them)."""
        self._count_generation += 1
        self._count = True
        self._count_until = time.monotonic() + self._settings.ttl_s
        self._unknown.clear()

    # --- internals: database keys ----------------------------------------------------------

    def _may_probe(self, now: float) -> bool:
        """Whether a call may wait on the database now: it is not known to be down, or its next
        probe is due (then the probe is taken: others skip the database until the next one)."""
        if not self._down:
            return True
        if now < self._probe_at:
            return False
        self._probe_at = now + _DOWN_BACKOFF_S
        return True

    async def _lookup(self, digest: str) -> Tenant | None:
        """The cached or freshly read tenant of a digest (None: unknown).

        Raises:
            GatewayError: KEY_STORE_UNAVAILABLE (not cached, or past its stale period, and the
                database cannot be reached).
        """
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None:
            if now < entry.fresh_until:
                self._entries.move_to_end(digest)
                if now >= entry.refresh_after and not self._down:
                    entry.refresh_after = entry.fresh_until  # one background read per TTL
                    self._refresh_behind(digest)
                return entry.tenant
            if now < entry.stale_until and self._down:
                self._entries.move_to_end(digest)
                if self._may_probe(now):
                    self._refresh_behind(digest)
                return entry.tenant
        elif now < self._unknown.get(digest, 0.0):
            return None
        if self._store is None:
            return None
        if not self._may_probe(now):
            raise key_store_unavailable(retry_after_s=_DOWN_BACKOFF_S)
        try:
            return await self._wait(self._load_shared(digest), "find_key")
        except StoreUnavailableError:
            entry = self._entries.get(digest)
            if entry is not None and time.monotonic() < entry.stale_until:
                log.warning("key_cache_serving_stale", key_id=entry.tenant.key.id, reason="database unreachable")
                return entry.tenant
            raise key_store_unavailable(retry_after_s=_DOWN_BACKOFF_S) from None

    def _load_shared(self, digest: str) -> asyncio.Task[Tenant | None]:
        """The lookup of `digest` in flight, or a new one (single flight)."""
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.create_task(self._load(digest, self._generation))
            self._inflight[digest] = task
            self._background.add(task)
            task.add_done_callback(lambda done: self._load_done(digest, done))
        return task

    def _load_done(self, digest: str, task: asyncio.Task[Tenant | None]) -> None:
        if self._inflight.get(digest) is task:
            del self._inflight[digest]
        self._background_done(task)

    def _refresh_behind(self, digest: str) -> None:
        """Re-reads a cached digest in the background (failures keep the entry as it is)."""
        if digest not in self._inflight and not self._closed:
            self._load_shared(digest)

    async def _bounded(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """Runs database calls within `timeout_s`; every failure becomes StoreUnavailableError
        (and the database counts as down until a call succeeds).

        Raises:
            StoreUnavailableError: the store failed or did not answer in time.
        """
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await call()
        except StoreUnavailableError as exc:
            self._mark_down(what, str(exc))
            raise
        except TimeoutError as exc:
            self._mark_down(what, f"no answer within {self._timeout_s:g}s")
            raise StoreUnavailableError(f"no answer within {self._timeout_s:g}s") from exc
        except Exception as exc:  # a store bug or schema problem: cached keys keep working
            log.error("key_store_error", what=what, error=f"{type(exc).__name__}: {exc}")
            self._mark_down(what, type(exc).__name__)
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        if self._down:
            log.info("key_store_available", what=what)
        self._down = False
        return result

    async def _wait(self, task: asyncio.Task[T], what: str) -> T:
        """Awaits a shared database task for at most `timeout_s` (a database that hangs even its
        cancellation cannot hold a caller longer); the task itself goes on.

        Raises:
            StoreUnavailableError: the task failed, or did not end in time.
        """
        try:
            async with asyncio.timeout(self._timeout_s):
                return await asyncio.shield(task)
        except TimeoutError:
            self._mark_down(what, f"no answer within {self._timeout_s:g}s")
            raise StoreUnavailableError(f"no answer within {self._timeout_s:g}s") from None

    def _mark_down(self, what: str, error: str) -> None:
        """The database failed: it counts as down (logged once) until a call succeeds."""
        if not self._down:
            log.warning(
                "key_store_unavailable",
                what=what,
                error=error,
                note=f"cached keys keep working up to {self._settings.stale_s:g}s past their TTL; unknown keys "
                "are UNAVAILABLE",
            )
            self._down = True
            self._probe_at = time.monotonic() + _DOWN_BACKOFF_S

    async def _load(self, digest: str, generation: int) -> Tenant | None:
        """Reads a digest's key, team and spend seeds, and caches the answer unless an
        invalidation came in meanwhile.

        Raises:
            StoreUnavailableError: see `_bounded`.
        """
        tenant = await self._bounded(lambda: self._fetch(digest), "find_key")
        if generation == self._generation and not self._closed:
            self._put(digest, tenant)
        return tenant

    async def _fetch(self, digest: str) -> Tenant | None:
        assert self._store is not None
        key = await self._store.find_key(digest)
        if key is None:
            return None
        if key.id in self._configured_ids:
            log.warning("key_shadows_configured_key", key_id=key.id, note="refused: the configured key wins")
            return None
        team = await self._store.get_team(key.team_id) if key.team_id else None
        now = datetime.now(UTC)
        if not _usable(key, now):
            return Tenant(key, team)
        key_spend = await self._spend("key", key.id, key.budget, now)
        team_spend = await self._spend("team", team.id, team.budget, now) if team is not None else None
        return Tenant(key, team, key_spend, team_spend)

    async def _spend(self, kind: ScopeKind, scope_id: str, budget: Budget | None, now: datetime) -> SpendSeed | None:
        if budget is None:
            return None
        assert self._store is not None
        start, _ = budget.bounds(now)
        return SpendSeed(start, await self._store.spend(kind, scope_id, start))

    def _put(self, digest: str, tenant: Tenant | None) -> None:
        """Caches a lookup's answer; then drops unknown digests, oldest first, and then the least
        recently used keys while more than `max_entries` are held."""
        settings = self._settings
        now = time.monotonic()
        previous = self._entries.pop(digest, None)
        if previous is not None:
            self._unindex(previous.tenant.key.id, digest)
        self._unknown.pop(digest, None)
        while self._unknown and next(iter(self._unknown.values())) <= now:
            self._unknown.popitem(last=False)
        if tenant is None:
            if settings.negative_ttl_s > 0:
                self._unknown[digest] = now + settings.negative_ttl_s
        else:
            ttl = settings.ttl_s
            self._entries[digest] = _Entry(tenant, now + ttl, now + ttl + settings.stale_s, now + ttl * _REFRESH_AHEAD)
            self._digests_by_key.setdefault(tenant.key.id, set()).add(digest)
        while len(self._entries) + len(self._unknown) > settings.max_entries:
            if self._unknown:
                self._unknown.popitem(last=False)
            else:
                evicted, old = self._entries.popitem(last=False)
                self._unindex(old.tenant.key.id, evicted)

    def _unindex(self, key_id: str, digest: str) -> None:
        digests = self._digests_by_key.get(key_id)
        if digests is not None:
            digests.discard(digest)
            if not digests:
                del self._digests_by_key[key_id]

    # --- internals: configured keys' spend seeds ------------------------------------------

    async def _configured_tenant(self, configured: _Configured) -> Tenant:
        """A configured key's tenant with a spend seed for the current period when it has a budget
        (read now, at most `timeout_s`, if it was never read for this period)."""
        if configured.record.budget is None or self._store is None:
            return configured.tenant
        now = time.monotonic()
        if time.time() < configured.seed_until:
            if now >= configured.reread_at:
                self._seed_behind(configured, now)
            return configured.tenant
        if self._down and now < self._probe_at and configured.record.id not in self._seeding:
            self._provisional_seed(configured, "database unreachable")
            return configured.tenant
        try:
            await self._wait(self._seed_behind(configured, now), "spend")
        except StoreUnavailableError:
            self._provisional_seed(configured, "database unreachable")
        return configured.tenant

    def _seed_behind(self, configured: _Configured, now: float) -> asyncio.Task[None]:
        """Reads a configured key's spend seed in the background (single flight per key)."""
        key_id = configured.record.id
        task = self._seeding.get(key_id)
        if task is None:
            configured.reread_at = now + self._settings.ttl_s
            task = asyncio.create_task(self._read_seed(configured))
            self._seeding[key_id] = task
            self._background.add(task)
            task.add_done_callback(lambda done: self._seed_done(key_id, done))
        return task

    def _seed_done(self, key_id: str, task: asyncio.Task[None]) -> None:
        if self._seeding.get(key_id) is task:
            del self._seeding[key_id]
        self._background_done(task)

    async def _read_seed(self, configured: _Configured) -> None:
        budget = configured.record.budget
        assert budget is not None and self._store is not None
        store = self._store
        now = datetime.now(UTC)
        start, end = budget.bounds(now)
        try:
            spent = await self._bounded(lambda: store.spend("key", configured.record.id, start), "spend")
        except StoreUnavailableError:
            self._provisional_seed(configured, "database unreachable")
            return
        configured.tenant = Tenant(configured.record, None, SpendSeed(start, spent))
        configured.seed_until = end.timestamp() if end is not None else float("inf")

    def _provisional_seed(self, configured: _Configured, reason: str) -> None:
        """Seeds a configured key's budget with 0 for the current period until the database
        answers (read again after `_DOWN_BACKOFF_S`)."""
        budget = configured.record.budget
        assert budget is not None
        start, end = budget.bounds(datetime.now(UTC))
        if configured.tenant.key_spend is None or configured.tenant.key_spend.period_start != start:
            log.warning(
                "key_spend_seed_unavailable",
                key_id=configured.record.id,
                reason=reason,
                note="this key's budget counts from 0 in this process until the database answers",
            )
            configured.tenant = Tenant(configured.record, None, SpendSeed(start, 0))
        configured.seed_until = end.timestamp() if end is not None else float("inf")
        configured.reread_at = time.monotonic() + _DOWN_BACKOFF_S

    # --- internals: whether keys exist ----------------------------------------------------

    def _count_behind(self) -> asyncio.Task[bool]:
        """Whether database keys exist, read in the background (single flight)."""
        task = self._count_task
        if task is None or task.done():
            task = asyncio.create_task(self._refresh_count())
            self._background.add(task)
            task.add_done_callback(self._background_done)
            self._count_task = task
        return task

    async def _refresh_count(self) -> bool:
        """Reads whether database keys exist and caches it, unless a key was created or an
        invalidation came in meanwhile (then the next call reads again).

        Raises:
            StoreUnavailableError: see `_bounded`.
        """
        assert self._store is not None
        store = self._store
        generation = self._count_generation
        exists = await self._bounded(lambda: _positive(store.count_keys()), "count_keys")
        if generation == self._count_generation:
            self._count = exists
            self._count_until = time.monotonic() + self._settings.ttl_s
        return exists

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()


async def _positive(count: Awaitable[int]) -> bool:
    return await count > 0
