"""The usage ledger's layer: one `UsageRecord` per data-plane call that can cost money (Chat,
ChatStream, Embed), handed to the batching `LedgerWriter` when the call ends, however it ends:
answered, failed, refused, answered from the cache, cancelled by the client or past its deadline.

Placed right after authentication (before validation, rate limits, budgets and the cache):

- calls refused by validation, limits or budgets are recorded (cost 0, their status and reason);
- calls refused by authentication (no or bad key, MODEL_NOT_ALLOWED) are not: they have no tenant
  to account them to, and anyone could fill the ledger with them;
- without auth (loopback-only mode, or `auth.disabled`) calls are recorded with key "".

ListModels, GetModel and CountTokens are not recorded: they cost nothing at any provider
(CountTokens answers from a tokenizer or a free counting endpoint), and the ledger is what
spend and budgets are computed from.

Everything a record says comes from the call record and its typed `CallOutcome` (tokens, cost,
provider, attempts, status), never from the protobuf messages, plus the layer's own clock: the
call's start (UTC wall time), its latency and, for a stream, the time to its first message.
A cache hit costs 0 and records what the cached answer cost when it was made as the cost saved;
a stream cut after its first upstream event records the router's estimate of the tokens spent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
import structlog

from llm_gateway.v1 import llm_gateway_pb2 as pb

from ..domain import AttemptOutcome, Usage
from ..tenancy.ledger import LedgerWriter
from ..tenancy.records import UsageRecord, usd_to_nano
from ..transport.call_record import current_call
from .base import GatewayInterceptor, StreamBehavior, UnaryBehavior
from .observability import cancelled_code

log = structlog.get_logger(__name__)

_SERVICE = pb.DESCRIPTOR.services_by_name["LLMGatewayService"].full_name
# Full method name → the short name a record carries, for the calls that are recorded.
RECORDED_METHODS = {f"/{_SERVICE}/{name}": name for name in ("Chat", "ChatStream", "Embed")}
_NO_USAGE = Usage()


class LedgerInterceptor(GatewayInterceptor):
    """Records every Chat, ChatStream and Embed call in the usage ledger (see module docstring).

    Args:
        writer: the batching writer the records go to (`LedgerWriter.submit`: never blocks).
    """

    def __init__(self, writer: LedgerWriter) -> None:
        super().__init__()
        self._writer = writer

    async def unary(
        self, inner: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        name = RECORDED_METHODS.get(method)
        if name is None:
            return await inner(request, context)
        started_at, started = time.time(), time.perf_counter()
        try:
            return await inner(request, context)
        except asyncio.CancelledError:
            _note_cancelled(context)
            raise
        finally:
            self._record(name, started_at, started, None)

    async def stream(
        self, inner: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        name = RECORDED_METHODS.get(method)
        if name is None:
            async for message in inner(request, context):
                yield message
            return
        started_at, started = time.time(), time.perf_counter()
        first: float | None = None
        try:
            async for message in inner(request, context):
                if first is None:
                    first = time.perf_counter()
                yield message
        except (asyncio.CancelledError, GeneratorExit):
            _note_cancelled(context)
            raise
        finally:
            self._record(name, started_at, started, first)

    def _record(self, name: str, started_at: float, started: float, first: float | None) -> None:
        """Builds the call's record and submits it; a failure here is logged, never raised."""
        call = current_call.get()
        if call is None:  # served without the observability layer, which creates the record
            return
        try:
            outcome = call.outcome
            usage, cost, error, tenant = outcome.usage, outcome.cost, outcome.error, call.tenant
            hit = outcome.cache_hit
            saved = outcome.saved_cost if hit else None
            if usage is None:
                usage = _NO_USAGE
            record = UsageRecord(
                time=datetime.fromtimestamp(started_at, UTC),
                request_id=call.request_id,
                key_id=call.key_id,
                team_id=tenant.key.team_id if tenant is not None else "",
                end_user_id=call.end_user_id,
                method=name,
                model=call.model,
                provider=outcome.provider,
                deployment=outcome.deployment,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cached_input_tokens=usage.cached_input_tokens,
                cache_write_tokens=usage.cache_creation_input_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                cost_nano_usd=usd_to_nano(cost.total_usd) if cost is not None and not hit else 0,
                saved_cost_nano_usd=usd_to_nano(saved.total_usd) if saved is not None else 0,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                ttft_ms=None if first is None else (first - started) * 1000.0,
                status_code=outcome.code.name,
                reason=error.reason.value if error is not None else "",
                cache_hit=hit,
                attempts=sum(1 for a in outcome.attempts if a.outcome is not AttemptOutcome.SKIPPED),
            )
        except Exception:  # the call's answer never depends on the ledger
            log.exception("ledger_record_failed", request_id=call.request_id, method=name)
            return
        self._writer.submit(record)


def _note_cancelled(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Notes CANCELLED or DEADLINE_EXCEEDED on the outcome (as the observability layer, outside
    this one, does once this layer has recorded the call)."""
    call = current_call.get()
    if call is not None:
        call.outcome.code = cancelled_code(context)
