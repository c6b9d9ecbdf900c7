"""Prometheus metrics (prometheus-client) on their own HTTP port.

One process (`llm-gateway serve`): one `CollectorRegistry` per server, so several servers in one
process (tests) do not collide, served on `metrics_host:metrics_port`.

Several processes (`serve --workers N`): prometheus-client's multiprocess mode. The supervisor
creates an empty directory and passes it to every worker as `PROMETHEUS_MULTIPROC_DIR`; with it
set when prometheus-client is imported, every metric value lives in per-process memory-mapped
files in that directory, whatever registry the metric is registered with. Workers then serve no
HTTP themselves; the supervisor serves `/metrics` from `SharedMetrics` (a
`MultiProcessCollector` over a fresh `CollectorRegistry`): counters and histograms summed over
every worker that ever ran (a restarted worker's counts stay), gauges by their
`multiprocess_mode` over the live workers (`mark_process_dead` drops an exited worker's).

Label values are bounded: `model` is a model the configuration names (a catalog model, or an
alias deployment / fallback), else "other" (a passthrough name a client chose), or "unresolved";
`reason` is an `errors.Reason` value; `key` an API key id (configured, or created through the
admin API: admins create them, clients cannot) or "anonymous"; `team` a team id (admin-created) or
""; `method` a gRPC method; `provider` a configured provider name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

if TYPE_CHECKING:
    from ..config import AliasSettings
    from ..routing.breaker import BreakerState
    from ..routing.catalog import Catalog
    from ..routing.resolver import Deployment

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# gen_ai.server.time_per_output_token's advised boundaries, with finer ones below 10 ms.
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5)
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}
OTHER_MODEL = "other"
UNRESOLVED_MODEL = "unresolved"
ANONYMOUS_KEY = "anonymous"

KnownModel = Callable[[str, str], bool]
"""`known_model(provider, provider_model)`: whether the configuration names that model (its
value may then be a `model` label; otherwise the label is "other")."""


class MetricsBindError(OSError):
    """The metrics HTTP server cannot bind `host:port`; `strerror` says why (an `OSError`, as
    prometheus-client raises, with the address the command line reports)."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.host = host
        self.port = port


def multiprocess_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """The shared metrics directory of this process (`PROMETHEUS_MULTIPROC_DIR`), or None."""
    return (os.environ if environ is None else environ).get(MULTIPROC_DIR_ENV) or None


def configured_models(catalog: Catalog, aliases: Sequence[AliasSettings] = ()) -> KnownModel:
    """The `known_model` predicate of a configuration: (provider, provider model) pairs of the
    catalog (built-in and `models:`), of the aliases' deployments, and of their fallback models
    named `provider/model`. Anything else (a passthrough name chosen by a client) is not known."""
    named: set[tuple[str, str]] = set()
    for alias in aliases:
        for deployment in alias.deployments:
            info = catalog.get(deployment.model)
            if info is not None and info.provider == deployment.provider:
                named.add((info.provider, info.provider_model))
            else:
                named.add((deployment.provider, deployment.model))
        for name in alias.fallback_models:
            prefix, _, rest = name.partition("/")
            if catalog.get(name) is None and rest:
                named.add((prefix, rest))
    frozen = frozenset(named)

    def known_model(provider: str, model: str) -> bool:
        return (provider, model) in frozen or catalog.get_by_provider_model(provider, model) is not None

    return known_model


def _serve(registry: CollectorRegistry, host: str, port: int) -> Any:
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise MetricsBindError(host, port, exc) from exc
    return server


def _shutdown(server: Any) -> None:
    server.shutdown()
    server.server_close()


class Metrics:
    """The gateway's metrics. Names are prefixed `llm_gateway_`; units in the names (seconds,
    USD); README "Metrics" maps them onto the OpenTelemetry GenAI conventions.

    Attributes:
        multiprocess: values go to the shared directory of `PROMETHEUS_MULTIPROC_DIR` (a
            `--workers` worker): `serve` then serves nothing, the directory's owner does.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = multiprocess_dir() is not None
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
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
        self.tpot = Histogram(
            "llm_gateway_time_per_output_token_seconds",
            "ChatStream time per output token after the first: (duration - time to first token) / (output tokens - 1)",
            ["model", "provider"],
            buckets=_PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "llm_gateway_overhead_seconds",
            "RPC wall time minus upstream attempt time",
            ["method"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "llm_gateway_in_flight_calls",
            "Calls being served now",
            ["method"],
            registry=r,
            multiprocess_mode="livesum",
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
        self.key_cost = Counter(
            "llm_gateway_key_cost_usd_total",
            "Estimated cost in USD at catalog prices by API key id (anonymous without auth)",
            ["key"],
            registry=r,
        )
        self.cache = Counter(
            "llm_gateway_cache_requests_total",
            "Cache lookups by result (hit/miss/bypass/error)",
            ["method", "result"],
            registry=r,
        )
        self.rate_limited = Counter(
            "llm_gateway_rate_limit_rejections_total",
            "Calls refused by a gateway limit (limit: requests, tokens, streams, budget, unpriced)",
            ["limit"],
            registry=r,
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
        self.retries = Counter(
            "llm_gateway_retries_total",
            "Attempts after the first on the same deployment (retries of a retryable failure)",
            ["method"],
            registry=r,
        )
        self.errors = Counter(
            "llm_gateway_errors_total",
            "Failed calls by method and ErrorInfo reason",
            ["method", "reason"],
            registry=r,
        )
        self.provider_errors = Counter(
            "llm_gateway_provider_errors_total",
            "Failed upstream attempts (each retry and fallback attempt counts), by provider and error reason",
            ["provider", "reason"],
            registry=r,
        )
        # The usage ledger (tenancy/ledger.py). `key` / `team` are ids of keys and teams, which
        # only admins create (a bounded set, like the configured keys of `key_cost`).
        self.spend = Counter(
            "llm_gateway_spend_usd_total",
            "Cost in USD at catalog prices by key and team, as recorded in the usage ledger (cache hits and "
            "refusals cost nothing; key anonymous without auth, team empty for a key without one)",
            ["key", "team"],
            registry=r,
        )
        # Budgets (interceptors/quota.py), per `keys/{id}` / `teams/{id}` with a budget: set at
        # every admitted budgeted call from the counters the admission returned (shared ones on
        # Redis). "max" across workers: each saw the shared counter at a different moment.
        self.budget_spend = Gauge(
            "llm_gateway_budget_spend_usd",
            "Spend in the budget's current period, USD, reservations of calls in flight included",
            ["subject"],
            registry=r,
            multiprocess_mode="max",
        )
        self.budget_limit = Gauge(
            "llm_gateway_budget_limit_usd",
            "The budget's limit per period, USD",
            ["subject"],
            registry=r,
            multiprocess_mode="max",
        )
        self.ledger_written = Counter(
            "llm_gateway_ledger_records_written_total", "Usage records written to the database", registry=r
        )
        self.ledger_dropped = Counter(
            "llm_gateway_ledger_records_dropped_total",
            "Usage records lost: overflow (buffer full while the database is down), drain (not written within "
            "the drain timeout), rejected (refused by the database alone), closed (submitted after the drain)",
            ["reason"],
            registry=r,
        )
        self.ledger_buffered = Gauge(
            "llm_gateway_ledger_buffered_records",
            "Usage records waiting to be written",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ledger_flush_failures = Counter(
            "llm_gateway_ledger_flush_failures_total", "Ledger writes that failed (retried)", registry=r
        )
        self.ledger_flush = Histogram(
            "llm_gateway_ledger_flush_duration_seconds",
            "Time of one successful ledger write (one batch, one transaction)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.breaker = Gauge(
            "llm_gateway_circuit_breaker_state",
            "Breaker state per deployment (0 closed, 1 half-open, 2 open); the worst over --workers",
            ["deployment"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._server: Any = None

    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, kept by label values: prometheus-client validates the values
        and takes a lock on every `labels` call, and each call updates about ten series. The
        objects kept are the metric's own children (no series exists here that the metric lacks;
        nothing removes children from these metrics)."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def breaker_listener(self, known_model: KnownModel) -> Callable[[Deployment, BreakerState], None]:
        """A `DeploymentStates` listener that sets the breaker gauge of the deployments whose
        model the configuration names (others are only logged: `breaker_transition`)."""
        gauge = self.breaker

        def on_transition(deployment: Deployment, state: BreakerState) -> None:
            if known_model(deployment.provider.name, deployment.provider_model):
                gauge.labels(deployment.key).set(BREAKER_STATE_VALUES[state.value])

        return on_transition

    def serve(self, host: str, port: int) -> None:
        """Starts the HTTP exposition server (`/metrics`) on host:port; in multiprocess mode it
        serves nothing (the supervisor serves every worker's values, `SharedMetrics`).

        Raises:
            MetricsBindError: host:port cannot be bound (in use, not a local address, ...).
        """
        if not self.multiprocess:
            self._server = _serve(self.registry, host, port)

    def stop(self) -> None:
        """Stops the HTTP server."""
        if self._server is not None:
            _shutdown(self._server)
            self._server = None


class SharedMetrics:
    """The `--workers` supervisor's side of multiprocess mode: a fresh directory for the workers'
    values (`environment()` names it for them) and `/metrics` over all of them.

    Raises (constructor):
        MetricsBindError: host:port cannot be bound (the directory is removed again).
    """

    def __init__(self, host: str, port: int) -> None:
        self.path = tempfile.mkdtemp(prefix="llm-gateway-metrics-")
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=self.path)  # type: ignore[no-untyped-call]
        try:
            self._server: Any = _serve(self.registry, host, port)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def environment(self) -> dict[str, str]:
        """The variables that put a worker in multiprocess mode over this directory."""
        return {MULTIPROC_DIR_ENV: self.path}

    def process_exited(self, pid: int) -> None:
        """Drops the live gauges (in flight, breaker state) of an exited worker; its counters and
        histograms stay in the sums."""
        mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Stops serving and removes the directory. Idempotent."""
        if self._server is not None:
            _shutdown(self._server)
            self._server = None
        shutil.rmtree(self.path, ignore_errors=True)
