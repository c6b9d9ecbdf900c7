"""Reserve/settle arithmetic of the tokens-per-minute and budget counters, property-tested against a
model of the counters, on the in-memory backend and on a real Redis: whatever amounts arrive
(negative, zero, past 2^31, past 2^53) and in whatever order reservations are settled, each
counter equals the model's (outstanding reservations + settled usage, each clamped to [0, 2^53))
and is never negative. A negative or huge amount once left a key refused for the rest of the
minute."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_gateway_server.state import memory, redis_backend
from llm_gateway_server.state.base import (
    MAX_TOKEN_AMOUNT,
    WINDOW_S,
    Admission,
    BudgetQuota,
    QuotaBackend,
    QuotaRequest,
    ScopeQuota,
)
from llm_gateway_server.tenancy.records import MAX_NANO_USD, BudgetPeriod

from .conftest import RedisServer

WINDOW = 29_000_007
NOW = WINDOW * WINDOW_S + 30.0  # one window for the whole run
TAG = "teams/prop"
# Limits that never refuse: only the arithmetic is under test.
BUDGET = BudgetQuota(2**62, BudgetPeriod.TOTAL, None, None, 0)
SCOPES = (
    ScopeQuota("keys/prop", rpm=10**9, budget=BUDGET),
    ScopeQuota("teams/prop", tpm=2**62, budget=BUDGET),
)
amounts = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63),
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 2**53, 2**53 - 1, -(2**53)]),
)
# An operation: ("admit", tokens, cost) or ("settle", which outstanding admission, tokens, cost).
operations = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), amounts, amounts),
        st.tuples(st.just("settle"), st.integers(min_value=0, max_value=50), amounts, amounts),
    ),
    max_size=40,
)


def _clamp(amount: int, top: int) -> int:
    return min(max(amount, 0), top)


async def _run(backend: QuotaBackend, ops: list[Any], read: Any) -> None:
    outstanding: list[Admission] = []
    tokens = cost = 0
    for op in ops:
        if op[0] == "admit":
            admission = await backend.admit(QuotaRequest(TAG, SCOPES, op[1], op[2], NOW))
            assert admission.allowed
            assert admission.reserved_tokens == _clamp(op[1], MAX_TOKEN_AMOUNT)
            assert admission.reserved_nano_usd == _clamp(op[2], MAX_NANO_USD)
            outstanding.append(admission)
            tokens += admission.reserved_tokens
            cost += admission.reserved_nano_usd
        elif outstanding:
            admission = outstanding.pop(op[1] % len(outstanding))
            await backend.settle(admission, op[2], op[3])
            tokens += _clamp(op[2], MAX_TOKEN_AMOUNT) - admission.reserved_tokens
            cost += _clamp(op[3], MAX_NANO_USD) - admission.reserved_nano_usd
        for scope in SCOPES:
            counted_tokens, spent = await read(scope.scope)
            assert counted_tokens == tokens >= 0
            assert spent == cost >= 0


@settings(max_examples=150, deadline=None)
@given(ops=operations)
def test_memory_counters_match_the_model(ops: list[Any]) -> None:
    backend = memory.MemoryQuotas()

    async def read(scope: str) -> tuple[int, int]:
        window = backend._windows.get(scope, [WINDOW, 0, 0])
        spend = backend._spend.get((scope, BUDGET.counter), [0, 0.0])
        return window[2], int(spend[0])

    asyncio.run(_run(backend, ops, read))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_redis_counters_match_the_model(ops: list[Any], redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port)
    client.flushall()

    async def scenario() -> None:
        backend = redis_backend.RedisQuotas(redis_server.url, 2.0)

        async def read(scope: str) -> tuple[int, int]:
            counted = client.hget(redis_backend.key(TAG, scope, "win", WINDOW), "t")
            spent = client.get(redis_backend.key(TAG, scope, BUDGET.counter))
            return int(counted or 0), int(spent or 0)

        try:
            await _run(backend, ops, read)
        finally:
            await backend.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("amount", [-(2**63), -1, 2**53, 2**64])
def test_amounts_are_clamped_before_they_are_reserved(amount: int) -> None:
    request = QuotaRequest(TAG, SCOPES, amount, amount, NOW)
    admission = asyncio.run(memory.MemoryQuotas().admit(request))
    assert 0 <= admission.reserved_tokens <= MAX_TOKEN_AMOUNT
    assert 0 <= admission.reserved_nano_usd <= MAX_NANO_USD
