"""The idle timeout of a stream with one timer per stream, re-armed lazily.

`asyncio.timeout` around every upstream event costs a timer handle, a context manager and an
exception frame per event (measured in bench/NOTES.md). An
`IdleTimeout` keeps one timer: each wait only notes when it started; when the timer fires it
checks whether the current wait is really overdue and otherwise re-arms itself for the right
moment. Cancellation follows `asyncio.timeout` (3.11): the waiting task is cancelled, and the
cancellation becomes `TimeoutError` unless someone else cancelled the task as well.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class IdleTimeout:
    """Bounds each `wait` to `idle_s` seconds and every wait to the absolute `deadline`.

    Args:
        idle_s: longest wait for one awaitable, seconds.
        deadline: event-loop time (`loop.time()`, seconds) no wait may pass.
    """

    __slots__ = ("_deadline", "_expired", "_handle", "_idle_s", "_loop", "_started", "_task", "_waiting")

    def __init__(self, idle_s: float, deadline: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle_s = idle_s
        self._deadline = deadline
        self._started = self._loop.time()
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None
        self._waiting = False
        self._expired = False

    def _due(self) -> float:
        return min(self._started + self._idle_s, self._deadline)

    def _fire(self) -> None:
        self._handle = None
        if not self._waiting or self._task is None:
            return  # the next wait arms the timer again
        if self._loop.time() < self._due():
            self._handle = self._loop.call_at(self._due(), self._fire)
            return
        self._expired = True
        self._task.cancel()

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """Awaits `awaitable` from the current task.

        Raises:
            TimeoutError: `idle_s` passed or the deadline was reached first.
        """
        task = asyncio.current_task()
        assert task is not None, "IdleTimeout.wait runs in a task"
        self._task = task
        cancelling = task.cancelling()
        self._started = self._loop.time()
        self._waiting = True
        if self._handle is None:
            self._handle = self._loop.call_at(self._due(), self._fire)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._expired and task.uncancel() <= cancelling:
                raise TimeoutError from None
            raise
        finally:
            self._waiting = False

    def close(self) -> None:
        """Cancels the timer (call once the stream ends)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
