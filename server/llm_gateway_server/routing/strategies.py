"""Orderings of a model's deployments, one function per routing strategy.

Each returns the deployments in the order the router tries them. Unknown measurements sort first
(a deployment never measured gets traffic, so it can be measured).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from ..domain import RoutingStrategy
from .deployment_state import DeploymentStates
from .resolver import Deployment


def _priority(deployments: Sequence[Deployment], states: DeploymentStates, rng: random.Random) -> list[Deployment]:
    return sorted(deployments, key=lambda d: d.priority)


def _weighted(deployments: Sequence[Deployment], states: DeploymentStates, rng: random.Random) -> list[Deployment]:
    """Weighted random order without replacement (Efraimidis-Spirakis keys u^(1/w))."""
    return sorted(deployments, key=lambda d: rng.random() ** (1.0 / d.weight), reverse=True)


def _least_latency(deployments: Sequence[Deployment], states: DeploymentStates, rng: random.Random) -> list[Deployment]:
    """By the moving average of time to first token where measured (streams), else of latency."""

    def key(d: Deployment) -> float:
        state = states.get(d)
        measured = state.ttft_ms if state.ttft_ms is not None else state.latency_ms
        return -1.0 if measured is None else measured

    return sorted(deployments, key=key)


def _lowest_cost(deployments: Sequence[Deployment], states: DeploymentStates, rng: random.Random) -> list[Deployment]:
    """By catalog price (input + output per million tokens); unpriced deployments last."""

    def key(d: Deployment) -> float:
        pricing = d.info.pricing if d.info else None
        return float("inf") if pricing is None else pricing.input_per_million_usd + pricing.output_per_million_usd

    return sorted(deployments, key=key)


def _least_busy(deployments: Sequence[Deployment], states: DeploymentStates, rng: random.Random) -> list[Deployment]:
    return sorted(deployments, key=lambda d: states.get(d).in_flight)


STRATEGIES: dict[
    RoutingStrategy, Callable[[Sequence[Deployment], DeploymentStates, random.Random], list[Deployment]]
] = {
    RoutingStrategy.PRIORITY: _priority,
    RoutingStrategy.WEIGHTED: _weighted,
    RoutingStrategy.LEAST_LATENCY: _least_latency,
    RoutingStrategy.LOWEST_COST: _lowest_cost,
    RoutingStrategy.LEAST_BUSY: _least_busy,
}


def order(
    deployments: Sequence[Deployment], strategy: RoutingStrategy, states: DeploymentStates, rng: random.Random
) -> list[Deployment]:
    """`deployments` in the order `strategy` tries them (CONFIGURED means PRIORITY here)."""
    return STRATEGIES.get(strategy, _priority)(deployments, states, rng)
