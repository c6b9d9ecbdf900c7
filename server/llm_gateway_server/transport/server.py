"""The grpc.aio server: the gateway service, `grpc.health.v1` health and server reflection.

Health answers SERVING for "" and for "llm_gateway.v1.LLMGatewayService" once the server runs.
On SIGTERM/SIGINT every health status becomes NOT_SERVING, then the server stops accepting calls
and gives in-flight calls `grace_period_s` to finish before cancelling them.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc

from ..config import ConfigError, Settings
from ..interceptors.auth import AuthInterceptor
from ..interceptors.cache import CacheInterceptor
from ..interceptors.observability import ObservabilityInterceptor
from ..interceptors.ratelimit import RateLimitInterceptor
from ..providers.registry import ProviderRegistry, build_registry
from ..routing.attempts import Executor, ExecutorSettings
from ..routing.breaker import BreakerState
from ..routing.catalog import load_catalog
from ..routing.models import ModelDirectory
from ..routing.resolver import Deployment, Resolver
from ..routing.router import Router
from ..routing.state import DeploymentStates
from ..state.base import CacheBackend, RateLimitBackend
from ..state.memory import MemoryCache, MemoryRateLimits
from ..state.redis_backend import RedisCache, RedisRateLimits
from ..telemetry.metrics import BREAKER_STATE_VALUES, Metrics
from .servicer import LLMGatewayServicer

log = structlog.get_logger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LLMGatewayService"].full_name


class _BreakerHealth:
    """Mirrors circuit breakers into health: `deployment/<provider>/<model>` is NOT_SERVING while its
    breaker is open; `provider/<name>` is NOT_SERVING while every deployment of it seen so far is
    open."""

    def __init__(
        self, health_servicer: health.aio.HealthServicer, states: DeploymentStates, registry: ProviderRegistry
    ) -> None:
        self._health = health_servicer
        self._states = states
        self._open: dict[str, set[str]] = {name: set() for name in registry.names()}
        self._seen: dict[str, set[str]] = {name: set() for name in registry.names()}
        self._tasks: set[asyncio.Task[None]] = set()

    def on_change(self, deployment: Deployment, state: BreakerState) -> None:
        provider = deployment.provider.name
        self._seen.setdefault(provider, set()).add(deployment.key)
        opened = self._open.setdefault(provider, set())
        if state is BreakerState.OPEN:
            opened.add(deployment.key)
        else:
            opened.discard(deployment.key)
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        updates = {
            f"deployment/{deployment.key}": not_serving if state is BreakerState.OPEN else serving,
            f"provider/{provider}": not_serving if opened == self._seen[provider] and opened else serving,
        }
        for name, status in updates.items():
            task = asyncio.get_running_loop().create_task(self._health.set(name, status))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


@dataclass
class RunningServer:
    """A started server and what it owns. `port` is the bound port (useful with port 0)."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    registry: ProviderRegistry
    port: int
    grace_period_s: float
    metrics: Metrics | None = None
    backends: tuple[RateLimitBackend | CacheBackend, ...] = ()

    async def stop(self) -> None:
        """Drains: health NOT_SERVING, stop accepting, wait up to the grace period, close clients."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_period_s)
        await self.registry.aclose()
        for backend in self.backends:
            await backend.aclose()
        if self.metrics is not None:
            self.metrics.stop()


_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def _interceptors(settings: Settings, metrics: Metrics | None) -> tuple[list[grpc.aio.ServerInterceptor], list[Any]]:
    """The chain, outermost first (observability → auth → rate limit → cache), and the backends.

    Raises:
        ConfigError: no API keys, auth not disabled, and a non-loopback bind address.
    """
    chain: list[grpc.aio.ServerInterceptor] = [ObservabilityInterceptor(metrics, settings.log_content)]
    backends: list[Any] = []
    auth = settings.auth
    if auth.keys and not auth.disabled:
        chain.append(AuthInterceptor(auth.keys))
        log.info("auth", mode="api_keys", keys=len(auth.keys))
    elif auth.disabled:
        log.warning("auth", mode="disabled", note="auth.disabled is set: every client is anonymous")
    elif settings.host not in _LOOPBACK:
        raise ConfigError(
            f"no API keys configured (auth.keys): refusing to serve on {settings.host}; configure keys, "
            "bind a loopback address, or set auth.disabled: true"
        )
    else:
        log.info("auth", mode="loopback_only", note="no API keys configured: serving on loopback only")
    limits = settings.rate_limits
    has_limits = any(
        v is not None for v in (limits.default_rpm, limits.default_tpm, limits.default_max_concurrent_streams)
    )
    has_limits = has_limits or any(k.rpm or k.tpm or k.max_concurrent_streams for k in auth.keys)
    if has_limits:
        rate_backend: RateLimitBackend = (
            RedisRateLimits(settings.redis_url, settings.redis_timeout_s) if settings.redis_url else MemoryRateLimits()
        )
        backends.append(rate_backend)
        chain.append(
            RateLimitInterceptor(
                rate_backend, limits, auth.keys, metrics, settings.default_deadline_s + settings.grace_period_s
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
        rate_limits=has_limits,
        cache=settings.cache.enabled,
    )
    return chain, backends


async def start_server(settings: Settings, environ: Mapping[str, str] | None = None) -> RunningServer:
    """Builds every layer from `settings` and starts serving on `settings.host:settings.port`.

    Raises:
        ConfigError: a provider is misconfigured.
        RuntimeError: the address cannot be bound.
    """
    env = dict(os.environ if environ is None else environ)
    catalog = load_catalog(settings.models)
    registry = build_registry(settings.providers, env)
    states = DeploymentStates(settings.breaker)
    executor = Executor(
        states,
        ExecutorSettings(
            settings.retry, settings.attempt_timeout_s, settings.stream_idle_timeout_s, settings.breaker.cooldown_s
        ),
    )
    resolver = Resolver(catalog, registry, settings.aliases)
    router = Router(catalog, resolver, executor, fallback_to_equivalents=settings.fallback_to_equivalents)
    directory = ModelDirectory(catalog, registry, ttl_s=settings.models_list_ttl_s, states=states)
    servicer = LLMGatewayServicer(router, directory, settings.default_deadline_s, settings.stream_coalescing)

    metrics = Metrics() if settings.metrics_port else None
    if metrics is not None:
        states.subscribe(lambda d, state: metrics.breaker.labels(d.key).set(BREAKER_STATE_VALUES[state.value]))
    try:
        chain, backends = _interceptors(settings, metrics)
    except ConfigError:
        await registry.aclose()
        raise
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Off unless --workers asked for it: a second gateway on a busy port must fail, not share it.
        ("grpc.so_reuseport", 1 if os.environ.get("LLM_GATEWAY_REUSE_PORT") == "1" else 0),
    ]
    server = grpc.aio.server(options=options, interceptors=chain)
    pb_grpc.add_LLMGatewayServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}" if ":" not in settings.host else f"[{settings.host}]:{settings.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        await registry.aclose()
        raise RuntimeError(f"cannot bind {address}")
    await server.start()
    if metrics is not None:
        metrics.serve(settings.metrics_host, settings.metrics_port)
    for name in ("", SERVICE_NAME, *(f"provider/{p}" for p in registry.names())):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    states.subscribe(_BreakerHealth(health_servicer, states, registry).on_change)
    log.info(
        "server_started",
        address=f"{settings.host}:{port}",
        providers=list(registry.names()),
        catalog_models=len(catalog.all()),
        metrics=f"http://{settings.metrics_host}:{settings.metrics_port}/metrics" if metrics else "off",
    )
    return RunningServer(server, health_servicer, registry, port, settings.grace_period_s, metrics, tuple(backends))


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM/SIGINT, then drains (see `RunningServer.stop`)."""
    running = await start_server(settings)
    # Everything loaded so far (SDKs, pydantic models, the catalog: ~120k objects) lives as long
    # as the process: moved out of the collector's reach, a full collection takes ~2 ms instead of
    # ~90 ms, a stall every call in flight would otherwise feel (bench/NOTES.md).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server_done = asyncio.ensure_future(running.server.wait_for_termination())
    stop_requested = asyncio.ensure_future(stop.wait())
    await asyncio.wait({server_done, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
    log.info("server_draining", grace_period_s=settings.grace_period_s)
    await running.stop()
    stop_requested.cancel()
    await server_done
    log.info("server_stopped")
