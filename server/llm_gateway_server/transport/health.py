"""`grpc.health.v1` statuses that mirror the circuit breakers.

`deployment/<provider>/<model>` exists from start for every known deployment (the configured
aliases' and the catalog's models of configured providers) and is NOT_SERVING while its breaker is
open; `provider/<name>` is NOT_SERVING only while every known deployment of it is open (one open
breaker does not mark a provider down while its other models answer); `state/<component>` (a Redis
backend: `rate_limit`, `cache`) is NOT_SERVING while calls skip Redis (its breaker is open).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping

import grpc
from grpc_health.v1 import health, health_pb2

from ..routing.breaker import BreakerState
from ..routing.resolver import Deployment

Subscribe = Callable[[Callable[[BreakerState], None]], None]


class GatewayHealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # untyped base
    """`grpc.health.v1.Health` as grpcio-health-checking serves it, plus:

    - `List` (the reference servicer leaves it UNIMPLEMENTED, though the service advertises it):
      every known service name and its status;
    - a drain: `enter_drain()` sets every status NOT_SERVING, sends it to every open `Watch`
      and then ends those streams (OK), so they do not hold the server's stop for the whole grace
      period; a `Watch` opened while draining gets NOT_SERVING and ends at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._watches: set[asyncio.Task[object]] = set()
        self._draining = False

    async def List(self, request: health_pb2.HealthListRequest, context: object) -> health_pb2.HealthListResponse:
        """Every service name with its status."""
        statuses = {name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()}
        return health_pb2.HealthListResponse(statuses=statuses)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        """The reference `Watch`, ended by the drain (see class docstring)."""
        if self._draining:
            await context.write(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING))
            return
        task = asyncio.current_task()
        assert task is not None
        self._watches.add(task)
        try:
            await super().Watch(request, context)
        except asyncio.CancelledError:
            if not self._draining or task.cancelling() > 1:  # cancelled by gRPC (client gone), not by the drain
                raise
            task.uncancel()
        finally:
            self._watches.discard(task)

    async def enter_drain(self) -> None:
        """Every status NOT_SERVING (permanently), sent to the watchers, whose streams then end."""
        self._draining = True
        await self.enter_graceful_shutdown()
        await asyncio.sleep(0)  # let each Watch write NOT_SERVING before it is ended
        for task in list(self._watches):
            task.cancel("drain: health watch ends")


class BreakerHealth:
    """A breaker listener (`DeploymentStates.subscribe`) that updates the health servicer.

    Args:
        health_servicer: the server's health servicer.
        providers: configured provider names.
    """

    def __init__(
        self,
        health_servicer: health.aio.HealthServicer,
        providers: Iterable[str],
        known: Iterable[str] = (),
    ) -> None:
        self._health = health_servicer
        self._open: dict[str, set[str]] = {name: set() for name in providers}
        self._known: dict[str, set[str]] = {name: set() for name in self._open}
        for key in known:  # `provider/model` deployment keys
            self._known.setdefault(key.split("/", 1)[0], set()).add(key)
        self._tasks: set[asyncio.Task[None]] = set()

    def on_change(self, deployment: Deployment, state: BreakerState) -> None:
        """Sets the deployment's and its provider's health after a breaker transition."""
        provider = deployment.provider.name
        self._known.setdefault(provider, set()).add(deployment.key)
        opened = self._open.setdefault(provider, set())
        if state is BreakerState.OPEN:
            opened.add(deployment.key)
        else:
            opened.discard(deployment.key)
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        updates = {
            f"deployment/{deployment.key}": not_serving if state is BreakerState.OPEN else serving,
            f"provider/{provider}": not_serving if opened and opened >= self._known[provider] else serving,
        }
        for name, status in updates.items():
            task = asyncio.get_running_loop().create_task(self._health.set(name, status))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def watch_state_backends(health_servicer: health.aio.HealthServicer, backends: Mapping[str, Subscribe]) -> None:
    """Sets `state/<component>` SERVING now and follows each backend's breaker (`backends`: the
    component name → the backend's `subscribe`)."""
    tasks: set[asyncio.Task[None]] = set()
    for component, subscribe in backends.items():
        name = f"state/{component}"
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

        def changed(state: BreakerState, name: str = name) -> None:
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if state is BreakerState.OPEN
                else health_pb2.HealthCheckResponse.SERVING
            )
            task = asyncio.get_running_loop().create_task(health_servicer.set(name, status))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        subscribe(changed)
