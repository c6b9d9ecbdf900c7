"""The composition root: builds every layer from `Settings` and serves it.

catalog → provider registry → deployment states → executor → resolver → router → model
directory → servicer; metrics; the control plane (store → key cache + key events → usage ledger
→ admin servicer); the interceptor chain (observability → auth → ledger → validation → quota
(rate limits and budgets) → cache; the admin API: observability → admin auth) and its state
backends. `transport/server.py` only serves gRPC, health and reflection; this module is the one
place that knows how the pieces fit and the one that reads the process environment (for the
providers' standard variables).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import structlog

from .admin.auth import AdminAuthInterceptor
from .admin.servicer import ADMIN_METHOD_PREFIX, ADMIN_SERVICE_NAME, AdminServicer, add_admin_service
from .config import ConfigError, Settings
from .errors import GatewayError, quota_needs_shared_state
from .interceptors.auth import AuthInterceptor
from .interceptors.base import GatewayInterceptor, InterceptorChain
from .interceptors.cache import CacheInterceptor
from .interceptors.ledger import LedgerInterceptor
from .interceptors.observability import ObservabilityInterceptor
from .interceptors.quota import QuotaInterceptor
from .interceptors.validation import ValidationInterceptor
from .providers.registry import ProviderRegistry, build_registry
from .routing.catalog import Catalog, load_catalog
from .routing.deployment_state import DeploymentStates
from .routing.directory import ModelDirectory
from .routing.executor import Executor, ExecutorSettings
from .routing.pricing import CostEstimator
from .routing.resolver import Resolver
from .routing.router import Router
from .state.base import CacheBackend, QuotaBackend
from .state.key_events import KeyEvents
from .state.memory import MemoryCache, MemoryQuotas
from .state.redis_backend import RedisCache, RedisQuotas
from .store.base import Store
from .store.sql import open_store, resolve_database_url, safe_url
from .telemetry.metrics import Metrics, configured_models
from .telemetry.tracing import build_tracing
from .tenancy.key_cache import KeyCache
from .tenancy.ledger import LedgerWriter
from .tenancy.records import KeyRecord, TeamRecord
from .transport.health import BreakerHealth, watch_state_backends
from .transport.server import ConnectionPolicy, GrpcServer, ServiceAdder, start_grpc
from .transport.servicer import LLMGatewayServicer
from .transport.tls import ServerTls, server_tls

log = structlog.get_logger(__name__)
# How long before the end of the drain grace period the calls still running are cut with a status
# (the status must reach the client before gRPC cancels what is left at the grace's end).
_CUT_BEFORE_GRACE_END_S = 0.25
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass
class Application:
    """Everything the server serves, built from settings (see `build_application`)."""

    catalog: Catalog
    registry: ProviderRegistry
    states: DeploymentStates
    servicer: LLMGatewayServicer
    interceptors: list[grpc.aio.ServerInterceptor]
    backends: tuple[QuotaBackend | CacheBackend, ...]
    metrics: Metrics | None
    control: ControlPlane
    known_deployments: tuple[str, ...] = ()
    quota_layers: tuple[QuotaInterceptor, ...] = ()

    async def aclose(self) -> None:
        """Writes the ledger's last records (the drain), then closes the control plane, provider
        connection pools, state backends and the metrics server."""
        for layer in self.quota_layers:
            await layer.aclose()  # settlements of cancelled calls still running, before their backend closes
        await self.control.aclose()
        await self.registry.aclose()
        for backend in self.backends:
            await backend.aclose()
        if self.metrics is not None:
            self.metrics.stop()


@dataclass
class ControlPlane:
    """The store and what the data plane and the admin API use of it."""

    store: Store
    key_cache: KeyCache
    key_events: KeyEvents
    ledger: LedgerWriter
    admin: AdminServicer | None

    async def on_change(self, kind: str, resource_id: str | None) -> None:
        """An admin change (`AdminServicer`'s hook): applied to this process's key cache at once
        and published on Redis for every other replica."""
        if kind == "created" and resource_id:
            await self.key_events.key_created(resource_id)
        elif kind == "key" and resource_id:
            await self.key_events.key_changed(resource_id)
        elif kind == "team" and resource_id:
            await self.key_events.team_changed(resource_id)
        else:
            await self.key_events.everything_changed()

    async def aclose(self) -> None:
        """Flushes the ledger (bounded by `ledger.drain_timeout_s`), stops the key events and
        the key cache, closes the store."""
        try:
            await self.ledger.aclose()
        finally:
            await self.key_events.aclose()
            await self.key_cache.aclose()
            await self.store.aclose()


def has_configured_quotas(settings: Settings) -> bool:
    """Whether the settings set any rate limit or budget (defaults or configured keys)."""
    limits = settings.rate_limits
    defaults = (limits.default_rpm, limits.default_tpm, limits.default_max_concurrent_streams)
    return any(v is not None for v in defaults) or any(
        k.rpm or k.tpm or k.max_concurrent_streams or k.budget is not None for k in settings.auth.keys
    )


async def stored_quotas(settings: Settings) -> str:
    """The first key or team in the database with rate limits or a budget (`keys/{id}`,
    `teams/{id}`), or "" when none has them (a start-time check: reads every key and team).

    Raises:
        StoreError: the database cannot be opened or read.
    """
    store = await open_store(resolve_database_url(settings.database_url, settings.data_dir), settings.store)
    try:
        for kind in ("key", "team"):
            after = ""
            while True:
                page: Sequence[KeyRecord | TeamRecord] = (
                    await store.list_keys(None, after, 500, False)
                    if kind == "key"
                    else await store.list_teams(after, 500)
                )
                for record in page:
                    limits = record.limits
                    if record.budget is not None or any(
                        v is not None for v in (limits.rpm, limits.tpm, limits.max_concurrent_streams)
                    ):
                        return record.name
                if len(page) < 500:
                    break
                after = page[-1].id
        return ""
    finally:
        await store.aclose()


async def _auth(settings: Settings, key_cache: KeyCache) -> AuthInterceptor | None:
    """The auth interceptor, or None when auth is disabled.

    Auth applies as soon as any key exists (configured, or created through the admin API): with
    none at all, a loopback gateway serves anonymous calls; off loopback every call needs a key.

    Raises:
        ConfigError: off loopback, auth not disabled, and no key can ever exist: none configured,
            none in the store, and no admin credential to create one.
    """
    auth = settings.auth
    if auth.disabled:
        log.warning("auth", mode="disabled", note="auth.disabled is set: every client is anonymous")
        return None
    loopback = settings.host in _LOOPBACK
    admin_credential = settings.admin.enabled and bool(
        settings.admin.key_sha256 or (settings.admin_key and settings.admin_key.get_secret_value())
    )
    if not loopback and not auth.keys and not admin_credential and not await key_cache.keys_exist():
        raise ConfigError(
            f"no API keys (auth.keys, or keys in the database) and no admin credential (LLM_GATEWAY_ADMIN_KEY) "
            f"to create one: refusing to serve on {settings.host}; configure keys or an admin key, bind a "
            "loopback address, or set auth.disabled: true"
        )
    mode = "api_keys" if auth.keys else ("loopback_until_a_key_exists" if loopback else "api_keys_from_store")
    log.info("auth", mode=mode, configured_keys=len(auth.keys))
    return AuthInterceptor(key_cache, anonymous_when_no_keys=loopback)


def _transport_security(settings: Settings) -> ServerTls | None:
    """The TLS credentials (None: plaintext), enforcing the plaintext-on-loopback-only rule.

    Raises:
        ConfigError: invalid TLS files (see `transport.tls`), or no TLS on a non-loopback address
            without `tls.allow_plaintext: true`.
    """
    tls = server_tls(settings.tls)
    if tls is not None:
        log.info("tls", mode=tls.mode, files=tls.files)
    elif settings.host not in _LOOPBACK and not settings.tls.allow_plaintext:
        raise ConfigError(
            f"no TLS configured (tls.cert_file, tls.key_file): refusing plaintext on {settings.host}; set the "
            "certificate and key, bind a loopback address, or set tls.allow_plaintext: true"
        )
    elif settings.host not in _LOOPBACK:
        log.warning("tls", mode="plaintext", note="tls.allow_plaintext is set: serving plaintext off loopback")
    else:
        log.info("tls", mode="plaintext", note="no TLS configured: plaintext on loopback")
    return tls


def _interceptors(
    settings: Settings,
    auth: AuthInterceptor | None,
    metrics: Metrics | None,
    observability: ObservabilityInterceptor,
    ledger: LedgerWriter,
    estimate_cost: CostEstimator,
) -> tuple[list[GatewayInterceptor], list[QuotaBackend | CacheBackend]]:
    """The chain, outermost first (observability → auth → ledger → validation → quota → cache),
    and its backends. The quota layer (rate limits and budgets) is there whenever keys can carry
    limits or budgets (auth on: the admin API may set them at any time) or defaults are set."""
    chain: list[GatewayInterceptor] = [observability]
    backends: list[QuotaBackend | CacheBackend] = []
    if auth is not None:
        chain.append(auth)
    chain.append(LedgerInterceptor(ledger))
    chain.append(ValidationInterceptor())
    has_limits = auth is not None or has_configured_quotas(settings)
    if has_limits:
        quota_backend: QuotaBackend = (
            RedisQuotas(settings.redis_url, settings.redis_timeout_s) if settings.redis_url else MemoryQuotas()
        )
        backends.append(quota_backend)
        stream_max_age_s = settings.default_deadline_s + settings.grace_period_s
        chain.append(
            QuotaInterceptor(
                quota_backend, settings.rate_limits, settings.budgets, estimate_cost, metrics, stream_max_age_s
            )
        )
    if settings.cache.enabled:
        cache_backend: CacheBackend = (
            RedisCache(settings.redis_url, settings.redis_timeout_s)
            if settings.redis_url
            else MemoryCache(settings.cache.max_entries, settings.cache.max_bytes)
        )
        backends.append(cache_backend)
        chain.append(CacheInterceptor(cache_backend, settings.cache, metrics))
    log.info(
        "state",
        backend="redis" if settings.redis_url else "memory",
        quotas=has_limits,
        cache=settings.cache.enabled,
    )
    return chain, backends


def _known_deployments(settings: Settings, catalog: Catalog, registry: ProviderRegistry) -> tuple[str, ...]:
    """`provider/model` keys of the deployments health reports from start: every alias
    deployment and every catalog model of a configured provider."""
    keys = {f"{m.provider}/{m.provider_model}" for m in catalog.all() if registry.get(m.provider) is not None}
    for alias in settings.aliases:
        for deployment in alias.deployments:
            if registry.get(deployment.provider) is None:
                continue
            info = catalog.get(deployment.model)
            model = (
                info.provider_model if info is not None and info.provider == deployment.provider else deployment.model
            )
            keys.add(f"{deployment.provider}/{model}")
    return tuple(sorted(keys))


async def _control_plane(settings: Settings, metrics: Metrics | None) -> ControlPlane:
    """Opens the store (running its migrations) and builds the key cache, key events, ledger
    writer and admin servicer; starts their background tasks.

    Raises:
        ConfigError: the database cannot be opened or migrated (the reason, without secrets).
    """
    url = resolve_database_url(settings.database_url, settings.data_dir)
    try:
        store = await open_store(url, settings.store)
    except Exception as exc:  # noqa: BLE001 - every cause of a failed open is a start failure with its reason
        raise ConfigError(f"database {safe_url(url)}: {type(exc).__name__}: {exc}") from None
    log.info("store", database=safe_url(url))
    key_cache = KeyCache(store, settings.auth.keys, settings.key_cache, timeout_s=settings.store.timeout_s)
    key_events = KeyEvents(key_cache, settings.redis_url, timeout_s=settings.redis_timeout_s)
    ledger = LedgerWriter(store, settings.ledger, metrics)
    control = ControlPlane(store, key_cache, key_events, ledger, None)
    if settings.admin.enabled:
        control.admin = AdminServicer(
            store,
            configured_keys=key_cache.configured_keys,
            on_change=control.on_change,
            spend=ledger.spend,
            quota_guard=_quota_guard(settings),
        )
    await key_cache.start()
    await key_events.start()
    ledger.start()
    return control


def _quota_guard(settings: Settings) -> GatewayError | None:
    """The refusal of an admin change that sets limits or budgets, when this process cannot
    enforce them exactly: a `--workers` worker (SO_REUSEPORT) without Redis counts alone."""
    if settings.reuse_port and not settings.redis_url:
        return quota_needs_shared_state()
    return None


async def build_application(settings: Settings, environ: Mapping[str, str]) -> Application:
    """Builds every layer from `settings`; `environ` supplies the providers' API key variables.

    Raises:
        ConfigError: a provider is misconfigured, the database cannot be opened, or auth is
            required and no key can exist.
    """
    metrics = Metrics() if settings.metrics_port else None
    control = await _control_plane(settings, metrics)
    try:
        return await _data_plane(settings, environ, metrics, control)
    except BaseException:
        await control.aclose()
        raise


async def _data_plane(
    settings: Settings, environ: Mapping[str, str], metrics: Metrics | None, control: ControlPlane
) -> Application:
    auth = await _auth(settings, control.key_cache)
    catalog = load_catalog(settings.models)
    registry = build_registry(settings.providers, environ)
    states = DeploymentStates(settings.breaker)
    executor = Executor(
        states,
        ExecutorSettings(
            settings.retry, settings.attempt_timeout_s, settings.stream_idle_timeout_s, settings.breaker.cooldown_s
        ),
    )
    resolver = Resolver(catalog, registry, settings.aliases)
    router = Router(catalog, resolver, executor, states, fallback_to_equivalents=settings.fallback_to_equivalents)
    directory = ModelDirectory(catalog, registry, ttl_s=settings.models_list_ttl_s, states=states)
    servicer = LLMGatewayServicer(
        router, directory, settings.default_deadline_s, settings.stream_coalescing, settings.max_message_bytes
    )
    # Metric labels name only the models the configuration names; others count as "other".
    known_model = configured_models(catalog, settings.aliases)
    if metrics is not None:
        states.subscribe(metrics.breaker_listener(known_model))
    tracing = build_tracing(settings.tracing)
    observability = ObservabilityInterceptor(metrics, settings.log_content, known_model, tracing)
    chain, backends = _interceptors(settings, auth, metrics, observability, control.ledger, CostEstimator(resolver))
    known = _known_deployments(settings, catalog, registry)
    admin_layers: list[GatewayInterceptor] = [
        observability,
        AdminAuthInterceptor.from_settings(settings, control.key_cache.is_key),
    ]
    interceptors: list[grpc.aio.ServerInterceptor] = [
        InterceptorChain(chain, by_prefix={ADMIN_METHOD_PREFIX: admin_layers})
    ]
    quota_layers = tuple(layer for layer in chain if isinstance(layer, QuotaInterceptor))
    return Application(
        catalog, registry, states, servicer, interceptors, tuple(backends), metrics, control, known, quota_layers
    )


@dataclass
class RunningServer:
    """A serving gateway: the gRPC server and the application behind it."""

    grpc_server: GrpcServer
    application: Application
    tls: ServerTls | None = None
    admin_server: GrpcServer | None = None
    _stopped: bool = False

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.grpc_server.port

    @property
    def admin_port(self) -> int | None:
        """The admin API's port: the gRPC port, its own (`admin.port`), or None when disabled."""
        if self.admin_server is not None:
            return self.admin_server.port
        return self.port if self.application.control.admin is not None else None

    @property
    def metrics(self) -> Metrics | None:
        """The metrics (None when `metrics_port` is 0)."""
        return self.application.metrics

    def reload_tls(self) -> bool:
        """Re-reads the TLS certificate, key and client CA files (SIGHUP does this in `serve`).

        Returns:
            True when they are valid and new connections get them; False when TLS is off or the
            files are invalid (logged; the previous certificate stays in use).
        """
        return self.tls.reload() if self.tls is not None else False

    async def wait_for_termination(self) -> None:
        """Returns when the gRPC server has stopped."""
        await self.grpc_server.server.wait_for_termination()

    async def stop(self) -> None:
        """Drains (see `GrpcServer.stop`): calls still running shortly before the grace period
        ends are cut with UNAVAILABLE / SERVER_SHUTTING_DOWN and their `google.rpc.Status` (gRPC
        itself would drop them with a bare CANCELLED); then closes the application. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace_s = self.grpc_server.grace_period_s
        if self.admin_server is not None:
            await self.admin_server.stop()
        stopping = asyncio.ensure_future(self.grpc_server.stop())
        done, _ = await asyncio.wait({stopping}, timeout=max(grace_s - _CUT_BEFORE_GRACE_END_S, 0.0))
        if not done:
            cut = self.application.servicer.cut_in_flight()
            if cut:
                log.warning("drain_cut_calls", calls=cut, grace_period_s=grace_s)
        await stopping
        await self.application.aclose()


async def start_server(settings: Settings, environ: Mapping[str, str] | None = None) -> RunningServer:
    """Builds the application and serves it on `settings.host:settings.port`.

    Args:
        environ: the environment for provider keys (default: `os.environ`).
    Raises:
        ConfigError: a provider is misconfigured, auth is required and missing, the TLS files are
            invalid, or plaintext is refused on a non-loopback address.
        BindError: the address cannot be bound.
    """
    application = await build_application(settings, dict(os.environ if environ is None else environ))
    admin_server: GrpcServer | None = None
    grpc_server: GrpcServer | None = None
    try:
        tls = _transport_security(settings)
        if application.metrics is not None:  # before gRPC: a taken metrics port fails the start cleanly
            application.metrics.serve(settings.metrics_host, settings.metrics_port)
        connections = ConnectionPolicy(
            settings.max_connection_age_s,
            settings.max_connection_age_grace_s,
            settings.keepalive_time_s,
            settings.keepalive_timeout_s,
            settings.keepalive_min_time_s,
        )
        admin = application.control.admin
        admin_services: list[tuple[str, ServiceAdder]] = []
        if admin is not None:
            admin_services.append((ADMIN_SERVICE_NAME, lambda server: add_admin_service(server, admin)))
        if admin_services and settings.admin.port is not None:
            admin_server = await start_grpc(
                None,
                application.interceptors,
                host=settings.host,
                port=settings.admin.port,
                max_message_bytes=settings.max_message_bytes,
                reuse_port=settings.reuse_port,
                grace_period_s=settings.grace_period_s,
                connections=connections,
                reflection_on=settings.reflection,
                credentials=tls.credentials if tls is not None else None,
                services=admin_services,
            )
            admin_services = []
        grpc_server = await start_grpc(
            application.servicer,
            application.interceptors,
            host=settings.host,
            port=settings.port,
            max_message_bytes=settings.max_message_bytes,
            reuse_port=settings.reuse_port,
            grace_period_s=settings.grace_period_s,
            health_names=[
                *(f"provider/{p}" for p in application.registry.names()),
                *(f"deployment/{key}" for key in application.known_deployments),
            ],
            connections=connections,
            reflection_on=settings.reflection,
            credentials=tls.credentials if tls is not None else None,
            services=admin_services,
        )
    except BaseException:
        if admin_server is not None:
            await admin_server.stop()
        await application.aclose()
        raise
    breaker_health = BreakerHealth(grpc_server.health, application.registry.names(), application.known_deployments)
    application.states.subscribe(breaker_health.on_change)
    redis_backends = {
        "rate_limit" if isinstance(b, RedisQuotas) else "cache": b.subscribe
        for b in application.backends
        if isinstance(b, RedisQuotas | RedisCache)
    }
    await watch_state_backends(grpc_server.health, redis_backends)
    log.info(
        "server_started",
        address=f"{settings.host}:{grpc_server.port}",
        tls=tls.mode if tls is not None else "plaintext",
        providers=list(application.registry.names()),
        catalog_models=len(application.catalog.all()),
        metrics=f"http://{settings.metrics_host}:{settings.metrics_port}/metrics" if application.metrics else "off",
        admin=(
            "off"
            if application.control.admin is None
            else f"{settings.host}:{admin_server.port if admin_server is not None else grpc_server.port}"
        ),
    )
    return RunningServer(grpc_server, application, tls, admin_server)


async def serve(settings: Settings, on_ready: Callable[[RunningServer], None] | None = None) -> None:
    """Runs until SIGTERM/SIGINT, then drains (see `RunningServer.stop`); with TLS on, SIGHUP
    re-reads the certificate files (`RunningServer.reload_tls`). `on_ready` runs once the server
    serves and its signal handlers are installed (`serve --workers` reports readiness with it)."""
    running = await start_server(settings)
    # Everything loaded so far (SDKs, pydantic models, the catalog) lives as long as the process:
    # moved out of the collector's reach, full collections stay short (bench/NOTES.md).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if running.tls is not None:
        loop.add_signal_handler(signal.SIGHUP, running.reload_tls)
    if on_ready is not None:
        on_ready(running)
    server_done = asyncio.ensure_future(running.wait_for_termination())
    stop_requested = asyncio.ensure_future(stop.wait())
    await asyncio.wait({server_done, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
    signalled = loop.time()
    await running.grpc_server.enter_drain()  # health NOT_SERVING at once; watches end
    if settings.prestop_delay_s and not server_done.done():
        # Load balancers and Kubernetes endpoints take a moment to stop sending: keep serving.
        log.info("server_prestop", prestop_delay_s=settings.prestop_delay_s)
        await asyncio.wait({server_done}, timeout=settings.prestop_delay_s)
    log.info("server_draining", grace_period_s=settings.grace_period_s)
    await running.stop()
    stop_requested.cancel()
    await server_done
    log.info("server_stopped", drain_s=round(loop.time() - signalled, 3))
