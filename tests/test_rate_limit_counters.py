"""Reserve/reconcile arithmetic of the tokens-per-minute counters, property-tested against a model
of the counter, on the in-memory backend and on a real Redis: whatever amounts arrive (negative,
zero, past 2^31, past 2^53) and in whatever order reservations are reconciled, the counter equals
the model's (outstanding reservations + reconciled usage, each clamped to [0, 2^53)) and is never
negative. A negative or huge amount once left a key refused for the rest of the minute."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_gateway_server.state import memory, redis_backend
from llm_gateway_server.state.base import MAX_TOKEN_AMOUNT, RateLimitBackend, Reservation

from .conftest import RedisServer

WINDOW = 7
SCOPE = "key:prop"
amounts = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63),
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 2**53, 2**53 - 1, -(2**53)]),
)
# An operation: ("acquire", tokens) or ("reconcile", which outstanding reservation, actual tokens).
operations = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), amounts),
        st.tuples(st.just("reconcile"), st.integers(min_value=0, max_value=50), amounts),
    ),
    max_size=40,
)


def _clamp(tokens: int) -> int:
    return min(max(tokens, 0), MAX_TOKEN_AMOUNT)


@pytest.fixture(autouse=True)
def _fixed_window(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One window for the whole run (the real windows follow the wall clock)."""
    for module in (memory, redis_backend):
        monkeypatch.setattr(module, "current_window", lambda: (WINDOW, 30.0))
    yield


async def _run(backend: RateLimitBackend, ops: list[Any], read: Any) -> None:
    outstanding: list[Reservation] = []
    expected = 0
    for op in ops:
        if op[0] == "acquire":
            reservation = await backend.acquire(SCOPE, None, None, op[1])
            assert reservation.allowed and reservation.reserved_tokens == _clamp(op[1])
            outstanding.append(reservation)
            expected += _clamp(op[1])
        elif outstanding:
            reservation = outstanding.pop(op[1] % len(outstanding))
            await backend.reconcile(SCOPE, reservation, op[2])
            expected += _clamp(op[2]) - reservation.reserved_tokens
        counter = await read()
        assert counter == expected >= 0


@settings(max_examples=150, deadline=None)
@given(ops=operations)
def test_memory_counter_matches_the_model(ops: list[Any]) -> None:
    backend = memory.MemoryRateLimits()

    async def read() -> int:
        return backend._counts.get(SCOPE, (WINDOW, 0, 0))[2]

    asyncio.run(_run(backend, ops, read))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_redis_counter_matches_the_model(ops: list[Any], redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port)
    client.flushall()

    async def scenario() -> None:
        backend = redis_backend.RedisRateLimits(redis_server.url, 2.0)

        async def read() -> int:
            return int(client.get(redis_backend.key(SCOPE, "tok", WINDOW)) or 0)

        try:
            await _run(backend, ops, read)
        finally:
            await backend.aclose()

    asyncio.run(scenario())
