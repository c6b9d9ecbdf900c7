"""The gateway's error family (SPEC §7), independent of the transport.

Every failure a client can see is a `GatewayError`: a gRPC status code name, an UPPER_SNAKE
`reason` for `google.rpc.ErrorInfo`, a message that never contains a secret, `metadata` with every
dynamic value (provider, model, upstream status), and optional retry delay / field violations.
`transport/status.py` is the one place that turns these into gRPC statuses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ERROR_DOMAIN = "llm-gateway"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field: a path like `messages[0].role` and what is wrong with it."""

    field: str
    description: str


class GatewayError(Exception):
    """A failure with a gRPC status code, an ErrorInfo reason and metadata.

    Args:
        code: gRPC status code name, e.g. "NOT_FOUND".
        reason: ErrorInfo reason, UPPER_SNAKE, e.g. "MODEL_NOT_FOUND".
        message: human-readable text (never includes secrets).
        metadata: dynamic values for ErrorInfo.metadata (string to string).
        retry_after_s: delay for RetryInfo, seconds, when a retry can help.
        violations: field violations for BadRequest.
        quota: (subject, description) pairs for QuotaFailure.
        retryable: whether retrying the same deployment may succeed (429, 5xx, timeouts).
        fallback: whether another deployment may succeed (retryable errors, provider auth
            errors, a deployment missing the model); False for errors that would repeat
            (invalid request, content filter). Defaults to `retryable`.
    """

    def __init__(
        self,
        code: str,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        retry_after_s: float | None = None,
        violations: Sequence[FieldViolation] = (),
        quota: Sequence[tuple[str, str]] = (),
        retryable: bool = False,
        fallback: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_after_s = retry_after_s
        self.violations = tuple(violations)
        self.quota = tuple(quota)
        self.retryable = retryable
        self.fallback = retryable if fallback is None else fallback

    def with_metadata(self, **values: str) -> GatewayError:
        """Adds metadata entries (existing keys win) and returns self."""
        for key, value in values.items():
            self.metadata.setdefault(key, value)
        return self

    def __repr__(self) -> str:
        return f"GatewayError({self.code}, {self.reason}, {self.message!r}, {self.metadata!r})"


def invalid_request(violations: Sequence[FieldViolation]) -> GatewayError:
    """INVALID_ARGUMENT / INVALID_REQUEST listing every violation (BadRequest details)."""
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
    more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
    return GatewayError(
        "INVALID_ARGUMENT", "INVALID_REQUEST", f"invalid request: {summary}{more}", violations=violations
    )


def model_not_found(model: str, hint: str = "") -> GatewayError:
    """NOT_FOUND / MODEL_NOT_FOUND for a model the gateway cannot route."""
    text = f"model {model!r} is not known to the gateway"
    return GatewayError(
        "NOT_FOUND", "MODEL_NOT_FOUND", f"{text}{'; ' + hint if hint else ''}", metadata={"model": model}
    )


def capability_not_supported(model: str, capability: str, alternatives: Sequence[str] = ()) -> GatewayError:
    """INVALID_ARGUMENT / CAPABILITY_NOT_SUPPORTED, naming models that have the capability."""
    text = f"model {model!r} does not support {capability}"
    if alternatives:
        text += f"; models that do: {', '.join(alternatives[:10])}"
    return GatewayError(
        "INVALID_ARGUMENT",
        "CAPABILITY_NOT_SUPPORTED",
        text,
        metadata={"model": model, "capability": capability},
    )


def provider_not_configured(provider: str, model: str, how: str) -> GatewayError:
    """FAILED_PRECONDITION / PROVIDER_NOT_CONFIGURED: the model's provider has no credentials/host."""
    return GatewayError(
        "FAILED_PRECONDITION",
        "PROVIDER_NOT_CONFIGURED",
        f"model {model!r} is served by provider {provider!r}, which is not configured ({how})",
        metadata={"provider": provider, "model": model},
    )


def deadline_exceeded(provider: str, model: str, budget_s: float) -> GatewayError:
    """DEADLINE_EXCEEDED: the caller's deadline (or the default one) passed during the call."""
    return GatewayError(
        "DEADLINE_EXCEEDED",
        "DEADLINE_EXCEEDED",
        f"deadline of {budget_s:.3f}s passed while waiting for provider {provider!r}",
        metadata={"provider": provider, "model": model, "deadline_s": f"{budget_s:.3f}"},
    )
