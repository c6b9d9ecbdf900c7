"""The composition root: builds every layer from `Settings` and serves it.

catalog → provider registry → deployment states → executor → resolver → router → model
directory → servicer; metrics; the interceptor chain (observability → auth → validation → rate
limit → cache) and its state backends. `transport/server.py` only serves gRPC, health and
reflection; this module is the one place that knows how the pieces fit and the one that reads the
process environment (for the providers' standard variables).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
import structlog

from .config import ConfigError, Settings
from .interceptors.auth import AuthInterceptor
from .interceptors.base import GatewayInterceptor, InterceptorChain
from .interceptors.cache import CacheInterceptor
from .interceptors.observability import ObservabilityInterceptor
from .interceptors.ratelimit import RateLimitInterceptor
from .interceptors.validation import ValidationInterceptor
from .providers.registry import ProviderRegistry, build_registry
from .routing.catalog import Catalog, load_catalog
from .routing.deployment_state import DeploymentStates
from .routing.directory import ModelDirectory
from .routing.executor import Executor, ExecutorSettings
from .routing.resolver import Resolver
from .routing.router import Router
from .state.base import CacheBackend, RateLimitBackend
from .state.memory import MemoryCache, MemoryRateLimits
from .state.redis_backend import RedisCache, RedisRateLimits
from .telemetry.metrics import Metrics, configured_models
from .telemetry.tracing import build_tracing
from .transport.health import BreakerHealth, watch_state_backends
from .transport.server import ConnectionPolicy, GrpcServer, start_grpc
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
    backends: tuple[RateLimitBackend | CacheBackend, ...]
    metrics: Metrics | None
    known_deployments: tuple[str, ...] = ()

    async def aclose(self) -> None:
        """Closes provider connection pools, state backends and the metrics server."""
        await self.registry.aclose()
        for backend in self.backends:
            await backend.aclose()
        if self.metrics is not None:
            self.metrics.stop()


def _has_limits(settings: Settings) -> bool:
    limits = settings.rate_limits
    defaults = (limits.default_rpm, limits.default_tpm, limits.default_max_concurrent_streams)
    return any(v is not None for v in defaults) or any(
        k.rpm or k.tpm or k.max_concurrent_streams for k in settings.auth.keys
    )


def _auth(settings: Settings) -> AuthInterceptor | None:
    """The auth interceptor, or None when the gateway serves without keys.

    Raises:
        ConfigError: no API keys, auth not disabled, and a non-loopback bind address.
    """
    auth = settings.auth
    if auth.keys and not auth.disabled:
        log.info("auth", mode="api_keys", keys=len(auth.keys))
        return AuthInterceptor(auth.keys)
    if auth.disabled:
        log.warning("auth", mode="disabled", note="auth.disabled is set: every client is anonymous")
    elif settings.host not in _LOOPBACK:
        raise ConfigError(
            f"no API keys configured (auth.keys): refusing to serve on {settings.host}; configure keys, "
            "bind a loopback address, or set auth.disabled: true"
        )
    else:
        log.info("auth", mode="loopback_only", note="no API keys configured: serving on loopback only")
    return None


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
) -> tuple[list[GatewayInterceptor], list[RateLimitBackend | CacheBackend]]:
    """The chain, outermost first (observability → auth → validation → rate limit → cache), and
    its backends."""
    chain: list[GatewayInterceptor] = [observability]
    backends: list[RateLimitBackend | CacheBackend] = []
    if auth is not None:
        chain.append(auth)
    chain.append(ValidationInterceptor())
    has_limits = _has_limits(settings)
    if has_limits:
        rate_backend: RateLimitBackend = (
            RedisRateLimits(settings.redis_url, settings.redis_timeout_s) if settings.redis_url else MemoryRateLimits()
        )
        backends.append(rate_backend)
        stream_max_age_s = settings.default_deadline_s + settings.grace_period_s
        chain.append(
            RateLimitInterceptor(rate_backend, settings.rate_limits, settings.auth.keys, metrics, stream_max_age_s)
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
        rate_limits=has_limits,
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


def build_application(settings: Settings, environ: Mapping[str, str]) -> Application:
    """Builds every layer from `settings`; `environ` supplies the providers' API key variables.

    Raises:
        ConfigError: a provider is misconfigured, or auth is required and missing.
    """
    auth = _auth(settings)
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
    metrics = Metrics() if settings.metrics_port else None
    # Metric labels name only the models the configuration names; others count as "other".
    known_model = configured_models(catalog, settings.aliases)
    if metrics is not None:
        states.subscribe(metrics.breaker_listener(known_model))
    tracing = build_tracing(settings.tracing)
    observability = ObservabilityInterceptor(metrics, settings.log_content, known_model, tracing)
    chain, backends = _interceptors(settings, auth, metrics, observability)
    known = _known_deployments(settings, catalog, registry)
    interceptors: list[grpc.aio.ServerInterceptor] = [InterceptorChain(chain)]
    return Application(catalog, registry, states, servicer, interceptors, tuple(backends), metrics, known)


@dataclass
class RunningServer:
    """A serving gateway: the gRPC server and the application behind it."""

    grpc_server: GrpcServer
    application: Application
    tls: ServerTls | None = None
    _stopped: bool = False

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.grpc_server.port

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
    application = build_application(settings, dict(os.environ if environ is None else environ))
    try:
        tls = _transport_security(settings)
        if application.metrics is not None:  # before gRPC: a taken metrics port fails the start cleanly
            application.metrics.serve(settings.metrics_host, settings.metrics_port)
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
            connections=ConnectionPolicy(
                settings.max_connection_age_s,
                settings.max_connection_age_grace_s,
                settings.keepalive_time_s,
                settings.keepalive_timeout_s,
                settings.keepalive_min_time_s,
            ),
            reflection_on=settings.reflection,
            credentials=tls.credentials if tls is not None else None,
        )
    except BaseException:
        await application.aclose()
        raise
    breaker_health = BreakerHealth(grpc_server.health, application.registry.names(), application.known_deployments)
    application.states.subscribe(breaker_health.on_change)
    redis_backends = {
        "rate_limit" if isinstance(b, RedisRateLimits) else "cache": b.subscribe
        for b in application.backends
        if isinstance(b, RedisRateLimits | RedisCache)
    }
    await watch_state_backends(grpc_server.health, redis_backends)
    log.info(
        "server_started",
        address=f"{settings.host}:{grpc_server.port}",
        tls=tls.mode if tls is not None else "plaintext",
        providers=list(application.registry.names()),
        catalog_models=len(application.catalog.all()),
        metrics=f"http://{settings.metrics_host}:{settings.metrics_port}/metrics" if application.metrics else "off",
    )
    return RunningServer(grpc_server, application, tls)


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
