"""`routing.idle.IdleTimeout`: one lazily re-armed timer bounds every wait of a stream."""

from __future__ import annotations

import asyncio

import pytest

from llm_gateway_server.routing.idle import IdleTimeout


def _deadline(in_s: float) -> float:
    return asyncio.get_running_loop().time() + in_s


async def test_a_wait_longer_than_idle_times_out() -> None:
    idle = IdleTimeout(0.05, _deadline(10))
    with pytest.raises(TimeoutError):
        await idle.wait(asyncio.sleep(1))
    idle.close()


async def test_many_short_waits_outlast_the_idle_period() -> None:
    idle = IdleTimeout(0.08, _deadline(10))
    for _ in range(8):  # 8 × 30 ms = 240 ms in all, each wait well within 80 ms
        assert await idle.wait(asyncio.sleep(0.03, result="ok")) == "ok"
    idle.close()


async def test_time_between_waits_does_not_count() -> None:
    idle = IdleTimeout(0.05, _deadline(10))
    await idle.wait(asyncio.sleep(0))
    await asyncio.sleep(0.15)  # the consumer is slow, the upstream is not waited for: no timeout
    assert await idle.wait(asyncio.sleep(0.01, result=1)) == 1
    idle.close()


async def test_the_deadline_bounds_every_wait() -> None:
    idle = IdleTimeout(10, _deadline(0.05))
    with pytest.raises(TimeoutError):
        await idle.wait(asyncio.sleep(1))
    idle.close()


async def test_an_outside_cancel_stays_a_cancel() -> None:
    idle = IdleTimeout(10, _deadline(10))
    task = asyncio.create_task(idle.wait(asyncio.sleep(1)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    idle.close()
