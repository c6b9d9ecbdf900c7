"""Upstream failure → `GatewayError`, shared by every adapter.

Each adapter reduces its SDK's exception to (HTTP status, upstream message, upstream error
type/code, retry-after) and calls `from_http_status`; transport-level failures use
`connection_failed`, `upstream_timeout` and `bad_response`. The table below is the whole HTTP
status mapping (SPEC §7); adapters only add provider-specific detection of context-length and
content-policy rejections through `upstream_code`.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import GatewayError, Reason

_MAX_UPSTREAM_MESSAGE = 500  # chars of an upstream error message echoed to clients


@dataclass(frozen=True, slots=True)
class _Row:
    reason: Reason
    retryable: bool
    fallback: bool


# HTTP status → gateway error. 4xx not listed fall back to 400's row, 5xx to 500's.
_STATUS_TABLE: Mapping[int, _Row] = {
    400: _Row(Reason.PROVIDER_REJECTED, retryable=False, fallback=False),
    401: _Row(Reason.PROVIDER_AUTH_FAILED, retryable=False, fallback=True),
    402: _Row(Reason.PROVIDER_QUOTA_EXHAUSTED, retryable=False, fallback=True),  # billing
    403: _Row(Reason.PROVIDER_AUTH_FAILED, retryable=False, fallback=True),
    404: _Row(Reason.MODEL_NOT_FOUND, retryable=False, fallback=True),
    408: _Row(Reason.PROVIDER_UNAVAILABLE, retryable=True, fallback=True),
    409: _Row(Reason.PROVIDER_UNAVAILABLE, retryable=True, fallback=True),
    413: _Row(Reason.PROVIDER_REJECTED, retryable=False, fallback=False),
    422: _Row(Reason.PROVIDER_REJECTED, retryable=False, fallback=False),
    429: _Row(Reason.PROVIDER_RATE_LIMITED, retryable=True, fallback=True),
    498: _Row(Reason.PROVIDER_UNAVAILABLE, retryable=True, fallback=True),  # Groq flex capacity
    499: _Row(Reason.PROVIDER_UNAVAILABLE, retryable=True, fallback=True),  # request cancelled upstream
    500: _Row(Reason.PROVIDER_UNAVAILABLE, retryable=True, fallback=True),
}

# Upstream error codes/types (lower case) that mean "this input will never be accepted".
CONTEXT_LENGTH_CODES = frozenset({"context_length_exceeded", "string_above_max_length", "request_too_large"})
CONTENT_FILTER_CODES = frozenset({"content_filter", "content_policy_violation", "moderation_blocked"})
QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})


def _row_for(status: int) -> _Row:
    if status in _STATUS_TABLE:
        return _STATUS_TABLE[status]
    return _STATUS_TABLE[500] if status >= 500 else _STATUS_TABLE[400]


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_UPSTREAM_MESSAGE else text[: _MAX_UPSTREAM_MESSAGE - 1] + "…"


def parse_retry_after(headers: Mapping[str, str] | None, cap_s: float = 300.0) -> float | None:
    """Server-directed delay in seconds from `retry-after-ms`, then `retry-after` (seconds or an
    HTTP date), capped at `cap_s`; None when absent or unparsable. Source: the OpenAI/Anthropic/Groq
    SDKs' `_parse_retry_after_header` (shared/reference/provider-wire-formats.md §1.1)."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms:
        try:
            value_ms = float(raw_ms)
        except ValueError:
            value_ms = math.nan
        if not math.isnan(value_ms):  # NaN escapes min/max; ±inf is clamped
            return min(max(value_ms / 1000.0, 0.0), cap_s)
    raw = lowered.get("retry-after")
    if not raw:
        return None
    try:
        value = float(raw)
        return None if math.isnan(value) else min(max(value, 0.0), cap_s)
    except ValueError:
        parsed = email.utils.parsedate_tz(raw)
        if parsed is None:
            return None
        return min(max(email.utils.mktime_tz(parsed) - time.time(), 0.0), cap_s)


def from_http_status(
    provider: str,
    model: str,
    status: int,
    upstream_message: str,
    *,
    upstream_code: str = "",
    retry_after_s: float | None = None,
) -> GatewayError:
    """Maps an upstream HTTP error to the gateway error family.

    Args:
        provider: configured provider name, e.g. "openai".
        model: the provider model id that was called.
        status: upstream HTTP status (e.g. 429), or -1 for an error reported inside a stream.
        upstream_message: the provider's error message (clipped; omitted for auth failures,
            whose messages can echo part of a key).
        upstream_code: the provider's error code or type, used to detect context-length,
            content-policy and quota rejections.
        retry_after_s: the provider's requested delay, seconds (for RetryInfo).
    """
    code = upstream_code.lower()
    row = _row_for(status) if status > 0 else _STATUS_TABLE[500]
    if code in CONTENT_FILTER_CODES:
        row = _Row(Reason.CONTENT_FILTERED, retryable=False, fallback=False)
    elif code in CONTEXT_LENGTH_CODES:
        row = _Row(Reason.PROVIDER_REJECTED, retryable=False, fallback=False)
    elif status == 429 and code in QUOTA_CODES:
        row = _Row(Reason.PROVIDER_QUOTA_EXHAUSTED, retryable=False, fallback=True)
    if row.reason is Reason.PROVIDER_AUTH_FAILED:
        detail = "the provider rejected the gateway's credentials for it; check its API key"
    else:
        detail = _clip(upstream_message) or "no message"
    where = f"HTTP {status}" if status > 0 else "an error inside the stream"
    metadata = {"provider": provider, "model": model, "upstream_status": str(max(status, 0))}
    if upstream_code:
        metadata["upstream_code"] = upstream_code
    return GatewayError(
        row.reason,
        f"provider {provider!r} answered {where} for model {model!r}: {detail}",
        metadata=metadata,
        retry_after_s=retry_after_s if row.retryable else None,
        retryable=row.retryable,
        fallback=row.fallback,
    )


def connection_failed(provider: str, model: str, detail: str) -> GatewayError:
    """UNAVAILABLE / PROVIDER_UNAVAILABLE for a connection that failed or dropped."""
    return GatewayError(
        Reason.PROVIDER_UNAVAILABLE,
        f"could not reach provider {provider!r} for model {model!r}: {_clip(detail)}",
        metadata={"provider": provider, "model": model, "upstream_status": "0", "failure": "connection"},
        retryable=True,
    )


def upstream_timeout(provider: str, model: str, timeout_s: float) -> GatewayError:
    """UNAVAILABLE / PROVIDER_UNAVAILABLE when the provider's own configured timeout passed."""
    return GatewayError(
        Reason.PROVIDER_UNAVAILABLE,
        f"provider {provider!r} did not answer within {timeout_s:.1f}s for model {model!r}",
        metadata={"provider": provider, "model": model, "upstream_status": "0", "failure": "timeout"},
        retryable=True,
    )


def bad_response(provider: str, model: str, detail: str) -> GatewayError:
    """UNAVAILABLE / PROVIDER_BAD_RESPONSE for a body or stream the gateway cannot parse, or a
    stream that ended without its end marker."""
    return GatewayError(
        Reason.PROVIDER_BAD_RESPONSE,
        f"provider {provider!r} sent an unusable response for model {model!r}: {_clip(detail)}",
        metadata={"provider": provider, "model": model, "failure": "bad_response"},
        retryable=True,
    )
