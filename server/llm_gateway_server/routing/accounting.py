"""Usage estimates and cost from catalog prices.

When a provider reports no token counts (some OpenAI-compatible servers do not send usage in
streams), counts are estimated with `estimates` (4 characters per token plus framing) and
marked `estimated`.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..domain import Cost, Message, Pricing, Usage
from ..estimates import estimate_input_tokens, estimate_tokens


def usage_or_estimate(reported: Usage | None, messages: Iterable[Message], output_chars: int) -> Usage:
    """The provider's usage, or an estimate marked `estimated=True`."""
    if reported is not None:
        return reported
    return Usage(
        input_tokens=estimate_input_tokens(messages),
        output_tokens=estimate_tokens(output_chars),
        estimated=True,
    )


def cost_of(usage: Usage, pricing: Pricing | None) -> Cost:
    """Cost in USD: uncached input at the input price, cached input at the cached price (the
    input price when the catalog lists no discount), output at the output price."""
    if pricing is None:
        return Cost()
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    cached_price = pricing.cached_input_per_million_usd or pricing.input_per_million_usd
    input_usd = ((usage.input_tokens - cached) * pricing.input_per_million_usd + cached * cached_price) / 1_000_000
    output_usd = usage.output_tokens * pricing.output_per_million_usd / 1_000_000
    return Cost(input_usd=input_usd, output_usd=output_usd, priced=True)
