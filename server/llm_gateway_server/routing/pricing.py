"""Cost estimates before a call, for budget reservations (`interceptors/quota.py`).

`CostEstimator(resolver)(model, input_tokens, output_tokens)` is the most a call to `model` can
cost at catalog prices (`data/models.yaml` and the configuration's `models:`), in nano-USD:

- a catalog model, a `provider/model` name or a passthrough model: the price of the deployment
  the resolver picks (`Resolver.resolve_group`, without fallbacks);
- an alias (`aliases:`): the most expensive of its configured deployments for these token
  counts, since routing may pick any of them;
- a model no deployment of which has a price: None (unpriced; `budgets.unpriced_models` decides);
- a name that does not resolve (unknown model, unconfigured provider): 0, since the router
  refuses the call before anything is spent.

Prices come from the same `cost_of` the router charges with (`routing/accounting.py`): uncached
input at the input price, output at the output price. Fallbacks to other models (the catalog's
equivalents, `fallback_models`) are not priced in; `settle` charges what the call really cost.
"""

from __future__ import annotations

from collections import OrderedDict

from ..domain import Pricing, Usage
from ..errors import GatewayError
from ..tenancy.records import usd_to_nano
from .accounting import cost_of
from .resolver import Resolver

# Distinct model names whose prices are remembered (clients choose the names: bounded).
_MAX_MODELS = 4096


class CostEstimator:
    """Estimates a call's cost in nano-USD from the catalog (see module docstring).

    Args:
        resolver: resolves names the way the router does (catalog, aliases, providers).
    """

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._prices: OrderedDict[str, tuple[Pricing, ...] | None] = OrderedDict()

    def prices(self, model: str) -> tuple[Pricing, ...] | None:
        """The prices of the deployments `model` may be served by: () when it does not resolve,
        None when none of them has a price."""
        found = self._prices.get(model, ())
        if found != ():
            self._prices.move_to_end(model)
            return found
        try:
            group = self._resolver.resolve_group(model, equivalents=False)
        except GatewayError:
            return ()  # the router refuses it: nothing to price, not remembered
        priced = tuple(d.info.pricing for d in group.deployments if d.info is not None and d.info.pricing is not None)
        result = priced or None
        self._prices[model] = result
        if len(self._prices) > _MAX_MODELS:
            self._prices.popitem(last=False)
        return result

    def __call__(self, model: str, input_tokens: int, output_tokens: int) -> int | None:
        """The call's cost estimate, nano-USD (None: unpriced; 0: the model does not resolve).

        Args:
            model: the model the request names.
            input_tokens / output_tokens: the request's estimates (negative counts as 0).
        """
        prices = self.prices(model)
        if prices is None:
            return None
        usage = Usage(input_tokens=max(input_tokens, 0), output_tokens=max(output_tokens, 0))
        return max((usd_to_nano(cost_of(usage, pricing).total_usd) for pricing in prices), default=0)
