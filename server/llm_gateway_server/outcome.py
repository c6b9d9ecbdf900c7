"""The typed outcome of one call: filled while the call runs (by the router, the executor and the
cache) and read afterwards by the interceptors (logs, metrics, rate limits and, later, budgets).

Transport-neutral: the router fills it through `CallContext.outcome`; the interceptors reach it
through the per-RPC `CallRecord` (`transport/call_record.py`). No one reads protobuf messages to
learn what a call came to.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from .domain import Attempt, Cost, Usage
from .errors import GatewayError


@dataclass(slots=True)
class CallOutcome:
    """What one call came to so far.

    Attributes:
        provider / model: the deployment that served the call, or the last one tried (a failed
            call keeps it); `model` is the provider's model id ("" until resolved).
        answered_model: the model id the provider reported in its answer ("" until answered).
        usage: tokens of the answer (None until it is known; estimated counts say so).
        cost: USD of the answer at catalog prices (None until known; a cache hit costs nothing).
        saved_cost: for a cache hit, what the cached answer cost when it was first made (None
            otherwise): the usage ledger records it as the cost saved.
        attempts: every attempt made, skipped ones included, in order.
        ttft_ms: upstream time to first event of a stream, ms (None for unary calls).
        upstream_ms: time spent waiting on providers, summed over attempts, ms.
        cache_hit: the answer came from the response cache.
        completed: the whole answer was produced (a stream's final event included).
        code / error: the final status (OK until the call fails) and its error.
    """

    provider: str = ""
    model: str = ""
    answered_model: str = ""
    usage: Usage | None = None
    cost: Cost | None = None
    saved_cost: Cost | None = None
    attempts: tuple[Attempt, ...] = ()
    ttft_ms: float | None = None
    cache_hit: bool = False
    completed: bool = False
    code: grpc.StatusCode = grpc.StatusCode.OK
    error: GatewayError | None = None

    @property
    def deployment(self) -> str:
        """`provider/model` of the deployment ("" until resolved)."""
        return f"{self.provider}/{self.model}" if self.provider else ""

    @property
    def upstream_ms(self) -> float:
        """Time spent in attempts (ms): the call's latency minus this is the gateway's overhead."""
        return sum(a.latency_ms for a in self.attempts)

    @property
    def total_tokens(self) -> int:
        """Input + output tokens of the answer (0 until known)."""
        return 0 if self.usage is None else self.usage.input_tokens + self.usage.output_tokens

    def resolve(self, provider: str, model: str) -> None:
        """Notes the deployment being tried (`provider`, its `model` id)."""
        self.provider, self.model = provider, model

    def succeed(self, answered_model: str, usage: Usage, cost: Cost, attempts: tuple[Attempt, ...]) -> None:
        """Notes a complete answer."""
        self.answered_model, self.usage, self.cost, self.attempts = answered_model, usage, cost, attempts
        self.completed = True

    def fail(self, error: GatewayError) -> None:
        """Notes the call's final error (its provider/model metadata, when present, names the
        deployment if none was resolved yet)."""
        self.code, self.error = error.code, error
        if not self.provider and error.metadata.get("provider"):
            self.resolve(error.metadata["provider"], error.metadata.get("model", ""))
