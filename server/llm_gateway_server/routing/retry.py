"""Retry delays: exponential backoff with full jitter, or the provider's `retry-after`.

Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015): delay = uniform(0,
min(max_delay, base * 2**attempt)).
"""

from __future__ import annotations

import random

from ..config import RetrySettings


def retry_delay(settings: RetrySettings, attempt: int, retry_after_s: float | None, rng: random.Random) -> float | None:
    """Seconds to wait before retry number `attempt + 1` (attempt counts from 0), or None when the
    provider asks for longer than `max_retry_after_s` (move on instead of waiting)."""
    if retry_after_s is not None:
        return None if retry_after_s > settings.max_retry_after_s else retry_after_s
    return rng.uniform(0.0, min(settings.max_delay_s, settings.base_delay_s * (2**attempt)))
