"""`grpc.health.v1` statuses that mirror the circuit breakers.

`deployment/<provider>/<model>` is NOT_SERVING while its breaker is open; `provider/<name>` is
NOT_SERVING while every deployment of it seen so far is open; `state/<component>` (a Redis
backend: `rate_limit`, `cache`) is NOT_SERVING while calls skip Redis (its breaker is open).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping

from grpc_health.v1 import health, health_pb2

from ..routing.breaker import BreakerState
from ..routing.resolver import Deployment

Subscribe = Callable[[Callable[[BreakerState], None]], None]


class BreakerHealth:
    """A breaker listener (`DeploymentStates.subscribe`) that updates the health servicer.

    Args:
        health_servicer: the server's health servicer.
        providers: configured provider names.
    """

    def __init__(self, health_servicer: health.aio.HealthServicer, providers: Iterable[str]) -> None:
        self._health = health_servicer
        self._open: dict[str, set[str]] = {name: set() for name in providers}
        self._seen: dict[str, set[str]] = {name: set() for name in self._open}
        self._tasks: set[asyncio.Task[None]] = set()

    def on_change(self, deployment: Deployment, state: BreakerState) -> None:
        """Sets the deployment's and its provider's health after a breaker transition."""
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
