"""Per-call facts from the transport that the router needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..outcome import CallOutcome


@dataclass(frozen=True, slots=True)
class CallContext:
    """Per-call facts from the transport.

    Attributes:
        request_id: the gateway request id (from `x-request-id` or generated).
        deadline: absolute event-loop time (`loop.time()`, seconds) by which the call must end.
        outcome: filled by the router and the executor as the call runs (read by interceptors).
    """

    request_id: str
    deadline: float
    outcome: CallOutcome = field(default_factory=CallOutcome)
