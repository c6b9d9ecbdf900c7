"""The usage ledger's batching writer: calls hand their `UsageRecord` to `LedgerWriter.submit`
(synchronous, O(1), never blocks or raises) and one background task writes them to the store in
batches, off the hot path.

- **When**: at least every `flush_interval_s`, and as soon as `batch_size` records wait; one
  batch (at most `batch_size` records) is one `Store.write_usage` transaction, in submit order.
- **Database down**: any exception from the store is logged (the first failure of an outage, then
  at most every `_OUTAGE_LOG_INTERVAL_S`) and the batch is retried with exponential backoff
  (`_BACKOFF_START_S` doubling to `_BACKOFF_CAP_S`, jittered) while the records stay buffered in
  order. A batch that keeps failing with an error other than `StoreUnavailableError` (the
  database answers but refuses it) is written record by record, and a record the database
  refuses on its own is dropped ("rejected"), so one bad record cannot stop the ledger.
- **Bound**: at most `max_buffered` records wait (about 0.5 KB each in memory: the default
  100,000 hold about 50 MB, some minutes of a busy replica's calls); a record submitted beyond
  that is dropped ("overflow"). Every dropped record is counted
  (`llm_gateway_ledger_records_dropped_total{reason}`) and logged: one `ledger_records_dropped`
  error line with the counts at most every `_DROP_LOG_INTERVAL_S`, and always at the drain.
- **Drain**: `aclose` writes everything still buffered (retrying as above) within
  `drain_timeout_s`; what is left then is dropped ("drain"), counted and logged. Records
  submitted after the drain are dropped ("closed").
- **Spend not yet written**: `pending_spend` sums the buffered records of a key or team, and
  `spend` adds it to the store's sum exactly (no record counted twice or missed while a batch
  is being written).

Metrics (when given): records written, dropped, buffered (sampled at every write attempt),
write failures, write latency, and `llm_gateway_spend_usd_total{key, team}` counted on submit
(every call's spend, whether or not its record reaches the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog

from ..config import LedgerSettings
from ..store.base import ScopeKind, Store, StoreUnavailableError
from ..telemetry.metrics import ANONYMOUS_KEY, Metrics
from .records import UsageRecord, nano_to_usd

log = structlog.get_logger(__name__)

_BACKOFF_START_S = 0.1
_BACKOFF_CAP_S = 2.0
_DROP_LOG_INTERVAL_S = 10.0
_OUTAGE_LOG_INTERVAL_S = 10.0
# Consecutive failures of one batch with an error other than StoreUnavailableError before its
# records are written one by one (to find and drop the one the database refuses).
_ISOLATE_AFTER = 3


class LedgerWriter:
    """Buffers usage records and writes them in batches (see module docstring).

    Args:
        store: where records go (`Store.write_usage`, `Store.spend`).
        settings: flush interval (s), batch size, buffer bound (records), drain timeout (s).
        metrics: where to count (None: metrics off).
        clock: monotonic seconds (for the rate-limited log lines).

    Lifecycle: `start()` in the running event loop (records submitted before are kept), then
    `await aclose()` once no more calls run (after the gRPC server stopped), before the store
    is closed.
    """

    def __init__(
        self,
        store: Store,
        settings: LedgerSettings,
        metrics: Metrics | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._queue: deque[UsageRecord] = deque()
        self._wake = asyncio.Event()
        # Held while a batch is written and while `spend` reads the store: a batch is either in
        # the database or in the queue for a reader, never both or neither.
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._written = 0
        self._dropped = 0
        self._unlogged_drops: dict[str, int] = {}
        self._last_drop_log = -_DROP_LOG_INTERVAL_S
        self._outage_since: float | None = None
        self._outage_failures = 0
        self._last_outage_log = 0.0
        self._spend_children: dict[tuple[str, str], Any] = {}

    # --- the hot path ----------------------------------------------------------------------------

    def submit(self, record: UsageRecord) -> None:
        """Queues one record for writing; never blocks, never raises.

        Past `max_buffered` waiting records, or after the drain, the record is dropped (counted
        and logged, see module docstring). Its cost counts in `llm_gateway_spend_usd_total`
        either way.
        """
        try:
            if record.cost_nano_usd and self._metrics is not None:
                self._count_spend(record)
            if self._closed:
                self._drop(1, "closed")
                return
            queue = self._queue
            if len(queue) >= self._settings.max_buffered:
                self._drop(1, "overflow")
                return
            queue.append(record)
            if len(queue) >= self._settings.batch_size:
                self._wake.set()
        except Exception:  # the hot path never fails because of the ledger
            log.exception("ledger_submit_failed", request_id=record.request_id)

    def _count_spend(self, record: UsageRecord) -> None:
        scope = (record.key_id or ANONYMOUS_KEY, record.team_id)
        child = self._spend_children.get(scope)
        if child is None:
            assert self._metrics is not None
            child = self._spend_children[scope] = self._metrics.spend.labels(*scope)
        child.inc(nano_to_usd(record.cost_nano_usd))

    # --- what is not written yet ---------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Records waiting to be written (the batch being written included)."""
        return len(self._queue)

    @property
    def written(self) -> int:
        """Records written so far."""
        return self._written

    @property
    def dropped(self) -> int:
        """Records dropped so far (every reason)."""
        return self._dropped

    def pending_spend(self, kind: ScopeKind, scope_id: str, since: datetime | None) -> int:
        """nano-USD of the buffered records of a key (`kind` "key") or team ("team") whose call
        started at or after `since` (None: any time). O(buffered records)."""
        total = 0
        for record in self._queue:
            if (record.key_id if kind == "key" else record.team_id) == scope_id and (
                since is None or record.time >= since
            ):
                total += record.cost_nano_usd
        return total

    async def spend(self, kind: ScopeKind, scope_id: str, since: datetime | None) -> int:
        """nano-USD of a key's or team's calls started at or after `since` (None: ever): the
        store's sum plus `pending_spend`, read while no batch is being written (so exact).

        Raises:
            StoreUnavailableError: the database did not answer (see `Store.spend`).
        """
        async with self._lock:
            written = await self._store.spend(kind, scope_id, since)
            return written + self.pending_spend(kind, scope_id, since)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the background writer in the running event loop. Idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")
            self._task.add_done_callback(_report_crash)

    async def aclose(self) -> None:
        """Drains: writes every buffered record within `drain_timeout_s` (retrying while the
        database is down); what cannot be written in time is dropped, counted and logged.
        Records submitted afterwards are dropped ("closed"). Idempotent; never raises."""
        if self._closed:
            return
        self._closing = True
        self.start()
        task = self._task
        assert task is not None
        self._wake.set()
        done, _ = await asyncio.wait({task}, timeout=self._settings.drain_timeout_s)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._closed = True
        left = len(self._queue)
        if left:
            self._queue.clear()
            log.error(
                "ledger_drain_incomplete",
                records_lost=left,
                drain_timeout_s=self._settings.drain_timeout_s,
                note="the database did not take them in time",
            )
            self._drop(left, "drain")
        self._log_drops()
        self._sample_buffered()
        log.info("ledger_closed", records_written=self._written, records_dropped=self._dropped)

    # --- the background writer -------------------------------------------------------------------

    async def _run(self) -> None:
        interval = self._settings.flush_interval_s
        while True:
            if not self._closing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._wake.wait()
            self._wake.clear()
            await self._write_buffered()
            if self._unlogged_drops and self._clock() - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
                self._log_drops()
            if self._closing and not self._queue:
                return

    async def _write_buffered(self) -> None:
        """Writes batches until the queue is empty, retrying failures with backoff."""
        failures = 0
        while self._queue:
            count = min(len(self._queue), self._settings.batch_size)
            error = await self._write_batch(count)
            self._sample_buffered()
            if error is None:
                failures = 0
                continue
            failures += 1
            if not isinstance(error, StoreUnavailableError) and failures >= _ISOLATE_AFTER:
                await self._write_one_by_one(count)
                failures = 0
                continue
            delay = min(_BACKOFF_CAP_S, _BACKOFF_START_S * 2 ** min(failures - 1, 16))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def _write_batch(self, count: int) -> Exception | None:
        """Writes the first `count` queued records in one transaction; on success they leave the
        queue. Returns the store's error, or None."""
        batch = list(itertools.islice(self._queue, count))
        started = time.perf_counter()
        async with self._lock:
            try:
                await self._store.write_usage(batch)
            except Exception as exc:  # noqa: BLE001 - any store failure is retried
                self._write_failed(exc, count)
                return exc
            for _ in range(count):
                self._queue.popleft()
        self._wrote(count, time.perf_counter() - started)
        return None

    async def _write_one_by_one(self, count: int) -> None:
        """Writes the first `count` queued records one per transaction; a record the database
        refuses alone is dropped ("rejected"). Returns early when the database goes away."""
        for _ in range(count):
            record = self._queue[0]
            started = time.perf_counter()
            async with self._lock:
                try:
                    await self._store.write_usage([record])
                except StoreUnavailableError as exc:
                    self._write_failed(exc, 1)
                    return
                except Exception as exc:  # noqa: BLE001 - this record is what the database refuses
                    self._queue.popleft()
                    log.error(
                        "ledger_record_rejected",
                        request_id=record.request_id,
                        error=str(exc),
                        error_type=type(exc).__name__,
                    )
                    self._drop(1, "rejected")
                    continue
                self._queue.popleft()
            self._wrote(1, time.perf_counter() - started)

    def _wrote(self, count: int, elapsed_s: float) -> None:
        self._written += count
        if self._outage_since is not None:
            log.info(
                "ledger_store_recovered",
                outage_s=round(self._clock() - self._outage_since, 3),
                failures=self._outage_failures,
                buffered=len(self._queue),
            )
            self._outage_since = None
        if self._metrics is not None:
            self._metrics.ledger_written.inc(count)
            self._metrics.ledger_flush.observe(elapsed_s)

    def _write_failed(self, exc: Exception, count: int) -> None:
        now = self._clock()
        if self._metrics is not None:
            self._metrics.ledger_flush_failures.inc()
        if self._outage_since is None:
            self._outage_since, self._outage_failures = now, 0
        self._outage_failures += 1
        if self._outage_failures == 1 or now - self._last_outage_log >= _OUTAGE_LOG_INTERVAL_S:
            self._last_outage_log = now
            log.warning(
                "ledger_write_failed",
                error=str(exc),
                error_type=type(exc).__name__,
                records=count,
                buffered=len(self._queue),
                max_buffered=self._settings.max_buffered,
                failures=self._outage_failures,
                outage_s=round(now - self._outage_since, 3),
                note="retrying with backoff; records stay buffered",
            )

    def _drop(self, count: int, reason: str) -> None:
        self._dropped += count
        self._unlogged_drops[reason] = self._unlogged_drops.get(reason, 0) + count
        if self._metrics is not None:
            self._metrics.ledger_dropped.labels(reason).inc(count)
        if self._clock() - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            self._log_drops()

    def _log_drops(self) -> None:
        if not self._unlogged_drops:
            return
        self._last_drop_log = self._clock()
        log.error(
            "ledger_records_dropped",
            dropped=dict(self._unlogged_drops),
            dropped_total=self._dropped,
            buffered=len(self._queue),
            max_buffered=self._settings.max_buffered,
        )
        self._unlogged_drops.clear()

    def _sample_buffered(self) -> None:
        if self._metrics is not None:
            self._metrics.ledger_buffered.set(len(self._queue))


def _report_crash(task: asyncio.Task[None]) -> None:
    """Logs a background writer that ended with a bug (records would pile up unwritten)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("ledger_writer_crashed", exc_info=task.exception())
