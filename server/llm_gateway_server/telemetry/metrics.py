"""Prometheus metrics (prometheus-client) on their own HTTP port.

One `CollectorRegistry` per server, so several servers in one process (tests) do not collide.
Label values are bounded: `model` is the model that answered (or "unresolved"), never the raw
requested string of a failed call.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class MetricsBindError(OSError):
    """The metrics HTTP server cannot bind `host:port`; `strerror` says why (an `OSError`, as
    prometheus-client raises, with the address the command line reports)."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.host = host
        self.port = port


class Metrics:
    """The gateway's metrics. Names are prefixed `llm_gateway_`; units in the names (seconds, USD)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llm_gateway_requests_total",
            "RPCs by method, model, provider and status code",
            ["method", "model", "provider", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "llm_gateway_request_duration_seconds", "RPC wall time", ["method"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "llm_gateway_time_to_first_token_seconds",
            "ChatStream time to the first delta",
            ["model", "provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "llm_gateway_overhead_seconds",
            "RPC wall time minus upstream attempt time",
            ["method"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "llm_gateway_tokens_total",
            "Tokens spent at providers by direction (input/output); cache hits spend none",
            ["direction", "model", "provider"],
            registry=r,
        )
        self.cost = Counter(
            "llm_gateway_cost_usd_total",
            "Estimated cost in USD at catalog prices (cache hits cost nothing)",
            ["model", "provider"],
            registry=r,
        )
        self.cache = Counter(
            "llm_gateway_cache_requests_total",
            "Cache lookups by result (hit/miss/bypass/error)",
            ["method", "result"],
            registry=r,
        )
        self.rate_limited = Counter(
            "llm_gateway_rate_limit_rejections_total", "Calls refused by a gateway limit", ["limit"], registry=r
        )
        self.backend_errors = Counter(
            "llm_gateway_state_backend_errors_total",
            "State backend (Redis) failures by component and action taken",
            ["component", "action"],
            registry=r,
        )
        self.fallbacks = Counter(
            "llm_gateway_fallbacks_total",
            "Calls answered by other than the first deployment tried",
            ["method"],
            registry=r,
        )
        self.provider_errors = Counter(
            "llm_gateway_provider_errors_total", "Failed upstream attempts", ["provider", "reason"], registry=r
        )
        self.breaker = Gauge(
            "llm_gateway_circuit_breaker_state",
            "Breaker state per deployment (0 closed, 1 half-open, 2 open)",
            ["deployment"],
            registry=r,
        )
        self._server: Any = None

    def serve(self, host: str, port: int) -> None:
        """Starts the HTTP exposition server (`/metrics`) on host:port.

        Raises:
            MetricsBindError: host:port cannot be bound (in use, not a local address, ...).
        """
        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsBindError(host, port, exc) from exc

    def stop(self) -> None:
        """Stops the HTTP server."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
