"""The gateway's error family (SPEC §7), independent of the transport.

Every failure a client can see is a `GatewayError`: a `grpc.StatusCode`, a `Reason` for
`google.rpc.ErrorInfo`, a message that never contains a secret, `metadata` with every dynamic
value (provider, model, upstream status), and optional retry delay / field violations / quota
violations. Errors are immutable: `with_metadata` and `with_code` return copies.

`Reason` is the SPEC §7 table plus the reasons the gateway answers beyond it; each reason knows
the status code it is answered with by default. Errors are built only by the constructors in
this module (gateway-side failures) and in `providers/errors.py` (upstream failures), so a typo
in a code or reason is a type error, not a wrong status on the wire. `transport/status.py` is the
one place that turns them into gRPC statuses.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc

ERROR_DOMAIN = "llm-gateway"
# Alternatives named in CAPABILITY_NOT_SUPPORTED messages.
_MAX_ALTERNATIVES = 10


class Reason(enum.StrEnum):
    """`ErrorInfo.reason` values (UPPER_SNAKE), with the status code each is answered with."""

    # SPEC §7 table
    INVALID_REQUEST = "INVALID_REQUEST"
    API_KEY_INVALID = "API_KEY_INVALID"
    MODEL_NOT_ALLOWED = "MODEL_NOT_ALLOWED"
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    CAPABILITY_NOT_SUPPORTED = "CAPABILITY_NOT_SUPPORTED"
    PROVIDER_REJECTED = "PROVIDER_REJECTED"
    CONTENT_FILTERED = "CONTENT_FILTERED"
    PROVIDER_RATE_LIMITED = "PROVIDER_RATE_LIMITED"
    PROVIDER_UNAVAILABLE = "PROVIDER_UNAVAILABLE"
    PROVIDER_AUTH_FAILED = "PROVIDER_AUTH_FAILED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    # beyond the table
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    API_KEY_EXPIRED = "API_KEY_EXPIRED"
    API_KEY_DISABLED = "API_KEY_DISABLED"
    PROVIDER_NOT_CONFIGURED = "PROVIDER_NOT_CONFIGURED"
    PROVIDER_QUOTA_EXHAUSTED = "PROVIDER_QUOTA_EXHAUSTED"
    PROVIDER_TIMEOUT = "PROVIDER_TIMEOUT"
    PROVIDER_BAD_RESPONSE = "PROVIDER_BAD_RESPONSE"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"
    RATE_LIMITER_UNAVAILABLE = "RATE_LIMITER_UNAVAILABLE"
    MODEL_UNPRICED = "MODEL_UNPRICED"
    SERVER_SHUTTING_DOWN = "SERVER_SHUTTING_DOWN"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    # tenancy (keys, teams, budgets) and the admin API
    API_KEY_REVOKED = "API_KEY_REVOKED"
    KEY_STORE_UNAVAILABLE = "KEY_STORE_UNAVAILABLE"
    ADMIN_KEY_INVALID = "ADMIN_KEY_INVALID"
    NOT_AN_ADMIN_KEY = "NOT_AN_ADMIN_KEY"
    RESOURCE_NOT_FOUND = "RESOURCE_NOT_FOUND"
    RESOURCE_ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"
    KEY_READ_ONLY = "KEY_READ_ONLY"
    TEAM_NOT_EMPTY = "TEAM_NOT_EMPTY"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    QUOTA_NEEDS_SHARED_STATE = "QUOTA_NEEDS_SHARED_STATE"
    KEY_REVOKED = "KEY_REVOKED"

    @property
    def code(self) -> grpc.StatusCode:
        """The status code this reason is answered with (a stream cut after content is the one
        exception: UNAVAILABLE whatever the reason, see `GatewayError.with_code`)."""
        return _CODES[self]


_CODES: Mapping[Reason, grpc.StatusCode] = {
    Reason.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.API_KEY_INVALID: grpc.StatusCode.UNAUTHENTICATED,
    Reason.MODEL_NOT_ALLOWED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.RATE_LIMIT_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.BUDGET_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.MODEL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.CAPABILITY_NOT_SUPPORTED: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.PROVIDER_REJECTED: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.CONTENT_FILTERED: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.PROVIDER_RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.PROVIDER_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.PROVIDER_AUTH_FAILED: grpc.StatusCode.INTERNAL,
    Reason.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Reason.MALFORMED_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.API_KEY_EXPIRED: grpc.StatusCode.UNAUTHENTICATED,
    Reason.API_KEY_DISABLED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.PROVIDER_NOT_CONFIGURED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.PROVIDER_QUOTA_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.PROVIDER_TIMEOUT: grpc.StatusCode.UNAVAILABLE,
    Reason.PROVIDER_BAD_RESPONSE: grpc.StatusCode.UNAVAILABLE,
    Reason.CIRCUIT_OPEN: grpc.StatusCode.UNAVAILABLE,
    Reason.RATE_LIMITER_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.MODEL_UNPRICED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.SERVER_SHUTTING_DOWN: grpc.StatusCode.UNAVAILABLE,
    Reason.INTERNAL_ERROR: grpc.StatusCode.INTERNAL,
    Reason.API_KEY_REVOKED: grpc.StatusCode.UNAUTHENTICATED,
    Reason.KEY_STORE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.ADMIN_KEY_INVALID: grpc.StatusCode.UNAUTHENTICATED,
    Reason.NOT_AN_ADMIN_KEY: grpc.StatusCode.PERMISSION_DENIED,
    Reason.RESOURCE_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.RESOURCE_ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Reason.KEY_READ_ONLY: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.TEAM_NOT_EMPTY: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.STORE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.QUOTA_NEEDS_SHARED_STATE: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.KEY_REVOKED: grpc.StatusCode.FAILED_PRECONDITION,
}


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field: a path like `messages[0].role` and what is wrong with it."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class _Fields:
    reason: Reason
    message: str
    code: grpc.StatusCode
    metadata: dict[str, str]
    retry_after_s: float | None
    violations: tuple[FieldViolation, ...]
    quota: tuple[tuple[str, str], ...]
    retryable: bool
    fallback: bool


class GatewayError(Exception):
    """An immutable failure with a status code, an ErrorInfo reason and metadata.

    Build one with the constructors of this module or `providers/errors.py`.

    Args:
        reason: the ErrorInfo reason.
        message: human-readable text (never includes secrets).
        code: the status code; default `reason.code`.
        metadata: dynamic values for ErrorInfo.metadata (string to string).
        retry_after_s: delay for RetryInfo, seconds, when a retry can help.
        violations: field violations for BadRequest.
        quota: (subject, description) pairs for QuotaFailure.
        retryable: whether retrying the same deployment may succeed (429, 5xx, timeouts).
        fallback: whether another deployment may succeed (retryable errors, provider auth
            errors, a deployment missing the model); False for errors that would repeat
            (invalid request, content filter). Defaults to `retryable`.
    """

    _f: _Fields

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after_s: float | None = None,
        violations: Sequence[FieldViolation] = (),
        quota: Sequence[tuple[str, str]] = (),
        retryable: bool = False,
        fallback: bool | None = None,
    ) -> None:
        super().__init__(message)
        fields = _Fields(
            reason=reason,
            message=message,
            code=reason.code if code is None else code,
            metadata=dict(metadata or {}),
            retry_after_s=retry_after_s,
            violations=tuple(violations),
            quota=tuple(quota),
            retryable=retryable,
            fallback=retryable if fallback is None else fallback,
        )
        object.__setattr__(self, "_f", fields)

    @classmethod
    def _from(cls, fields: _Fields) -> GatewayError:
        error = cls.__new__(cls)
        Exception.__init__(error, fields.message)
        object.__setattr__(error, "_f", fields)
        return error

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("__"):  # __traceback__, __cause__, __notes__ … belong to the exception machinery
            super().__setattr__(name, value)
            return
        raise AttributeError(f"GatewayError is immutable (tried to set {name!r}); use with_metadata / with_code")

    @property
    def reason(self) -> Reason:
        """The ErrorInfo reason."""
        return self._f.reason

    @property
    def code(self) -> grpc.StatusCode:
        """The gRPC status code."""
        return self._f.code

    @property
    def message(self) -> str:
        """The status message."""
        return self._f.message

    @property
    def metadata(self) -> Mapping[str, str]:
        """ErrorInfo.metadata (read-only)."""
        return MappingProxyType(self._f.metadata)

    @property
    def retry_after_s(self) -> float | None:
        """RetryInfo delay, seconds; None without one."""
        return self._f.retry_after_s

    @property
    def violations(self) -> tuple[FieldViolation, ...]:
        """BadRequest field violations."""
        return self._f.violations

    @property
    def quota(self) -> tuple[tuple[str, str], ...]:
        """QuotaFailure (subject, description) pairs."""
        return self._f.quota

    @property
    def retryable(self) -> bool:
        """Whether retrying the same deployment may succeed."""
        return self._f.retryable

    @property
    def fallback(self) -> bool:
        """Whether another deployment may succeed."""
        return self._f.fallback

    def with_metadata(self, **values: str) -> GatewayError:
        """A copy with metadata entries added (entries already present win); self when nothing
        would change."""
        added = {k: v for k, v in values.items() if k not in self.metadata}
        if not added:
            return self
        merged = {**self._f.metadata, **added}
        return GatewayError._from(dataclasses.replace(self._f, metadata=merged))

    def with_code(self, code: grpc.StatusCode) -> GatewayError:
        """A copy answered with `code` instead (e.g. UNAVAILABLE for a stream cut after content)."""
        return self if code is self.code else GatewayError._from(dataclasses.replace(self._f, code=code))

    def __reduce__(self) -> tuple[Any, ...]:
        return (GatewayError._from, (self._f,))

    def __repr__(self) -> str:
        return f"GatewayError({self.code.name}, {self.reason.value}, {self.message!r}, {dict(self.metadata)!r})"


# --- request and routing ---------------------------------------------------------------------


def invalid_request(violations: Sequence[FieldViolation]) -> GatewayError:
    """INVALID_ARGUMENT / INVALID_REQUEST listing every violation (BadRequest details)."""
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
    more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
    return GatewayError(Reason.INVALID_REQUEST, f"invalid request: {summary}{more}", violations=violations)


def malformed_request(message_type: str, detail: str, size: int) -> GatewayError:
    """INVALID_ARGUMENT / MALFORMED_REQUEST: the request body is not a valid `message_type`
    (`detail`: the protobuf runtime's reason; `size`: body bytes)."""
    return GatewayError(
        Reason.MALFORMED_REQUEST,
        f"the request is not a valid {message_type}: {detail}",
        metadata={"message_type": message_type, "request_bytes": str(size)},
    )


def model_not_found(model: str, hint: str = "") -> GatewayError:
    """NOT_FOUND / MODEL_NOT_FOUND for a model the gateway cannot route."""
    text = f"model {model!r} is not known to the gateway"
    return GatewayError(Reason.MODEL_NOT_FOUND, f"{text}{'; ' + hint if hint else ''}", metadata={"model": model})


def capability_not_supported(
    model: str, capability: str, alternatives: Sequence[str] = (), *, provider: str = "", detail: str = ""
) -> GatewayError:
    """INVALID_ARGUMENT / CAPABILITY_NOT_SUPPORTED, naming the provider (when known) and models
    that have the capability.

    Args:
        model: the model asked for.
        capability: what it lacks, e.g. "embeddings", "image input".
        alternatives: model ids that have it (the first ten are named).
        provider: the provider that would have served the call.
        detail: replaces the default "does not support" sentence.
    """
    text = detail or f"model {model!r} does not support {capability}"
    if alternatives:
        text += f"; models that do: {', '.join(alternatives[:_MAX_ALTERNATIVES])}"
    metadata = {"model": model, "capability": capability} if model else {"capability": capability}
    if provider:
        metadata["provider"] = provider
    return GatewayError(Reason.CAPABILITY_NOT_SUPPORTED, text, metadata=metadata)


def provider_not_configured(provider: str, model: str, how: str) -> GatewayError:
    """FAILED_PRECONDITION / PROVIDER_NOT_CONFIGURED: the model's provider has no credentials/host."""
    return GatewayError(
        Reason.PROVIDER_NOT_CONFIGURED,
        f"model {model!r} is served by provider {provider!r}, which is not configured ({how})",
        metadata={"provider": provider, "model": model},
    )


# --- attempts and deadlines ------------------------------------------------------------------


def deadline_exceeded(provider: str, model: str, budget_s: float) -> GatewayError:
    """DEADLINE_EXCEEDED: the caller's deadline (or the default one) passed during the call."""
    return GatewayError(
        Reason.DEADLINE_EXCEEDED,
        f"deadline of {budget_s:.3f}s passed while waiting for provider {provider!r}",
        metadata={"provider": provider, "model": model, "deadline_s": f"{budget_s:.3f}"},
    )


def attempt_timeout(provider: str, model: str, limit_s: float, *, stalled: bool) -> GatewayError:
    """UNAVAILABLE / PROVIDER_TIMEOUT: an attempt (or a stream between events, `stalled`) took
    longer than `limit_s` seconds. Retryable."""
    what = "sent nothing for" if stalled else "did not answer within"
    return GatewayError(
        Reason.PROVIDER_TIMEOUT,
        f"provider {provider!r} {what} {limit_s:.3g}s for model {model!r}",
        metadata={
            "provider": provider,
            "model": model,
            "failure": "stalled" if stalled else "timeout",
            "upstream_status": "0",
        },
        retryable=True,
    )


def all_deployments_unavailable(provider: str, model: str, retry_after_s: float) -> GatewayError:
    """UNAVAILABLE / CIRCUIT_OPEN: every deployment of the plan was skipped (breaker open or
    deployment limit reached); RetryInfo is the breaker cooldown."""
    return GatewayError(
        Reason.CIRCUIT_OPEN,
        "every deployment for this model is unavailable (circuit breaker open or deployment limit reached)",
        metadata={"provider": provider, "model": model},
        retry_after_s=retry_after_s,
    )


def stream_ended_early(provider: str, model: str, chunks_sent: int) -> GatewayError:
    """UNAVAILABLE / PROVIDER_BAD_RESPONSE: an upstream stream ended without its final event
    (before any event when `chunks_sent` is 0, which is retryable)."""
    what = "before any event" if chunks_sent == 0 else "without a final event"
    return GatewayError(
        Reason.PROVIDER_BAD_RESPONSE,
        f"provider {provider!r} stream ended {what}",
        metadata={"provider": provider, "model": model, "chunks_sent": str(chunks_sent)},
        retryable=chunks_sent == 0,
    )


# --- gateway policy (auth, limits) -----------------------------------------------------------


def api_key_invalid(message: str) -> GatewayError:
    """UNAUTHENTICATED / API_KEY_INVALID: no key, or a key the gateway does not know."""
    return GatewayError(Reason.API_KEY_INVALID, message)


def api_key_expired(key_id: str, expired_at: str) -> GatewayError:
    """UNAUTHENTICATED / API_KEY_EXPIRED (`expired_at`: ISO 8601)."""
    return GatewayError(
        Reason.API_KEY_EXPIRED, f"API key {key_id!r} expired at {expired_at}", metadata={"key_id": key_id}
    )


def api_key_disabled(key_id: str) -> GatewayError:
    """PERMISSION_DENIED / API_KEY_DISABLED."""
    return GatewayError(Reason.API_KEY_DISABLED, f"API key {key_id!r} is disabled", metadata={"key_id": key_id})


def model_not_allowed(key_id: str, model: str, team_id: str = "") -> GatewayError:
    """PERMISSION_DENIED / MODEL_NOT_ALLOWED: the key's `allowed_models` do not match `model`, or
    (`team_id` given) its team's do not."""
    if team_id:
        return GatewayError(
            Reason.MODEL_NOT_ALLOWED,
            f"API key {key_id!r} may not use model {model!r}: not allowed for its team {team_id!r}",
            metadata={"key_id": key_id, "model": model, "team_id": team_id},
        )
    return GatewayError(
        Reason.MODEL_NOT_ALLOWED,
        f"API key {key_id!r} may not use model {model!r}",
        metadata={"key_id": key_id, "model": model},
    )


def rate_limit_exceeded(scope: str, limit: str, value: int, what: str, reset_s: float) -> GatewayError:
    """RESOURCE_EXHAUSTED / RATE_LIMIT_EXCEEDED with RetryInfo (`reset_s`, seconds until the
    window resets) and QuotaFailure.

    Args:
        scope: what the limit counts against, e.g. "key:team-a".
        limit: "requests", "tokens" or "streams".
        value: the limit.
        what: its unit in words, e.g. "requests per minute".
    """
    return GatewayError(
        Reason.RATE_LIMIT_EXCEEDED,
        f"rate limit of {value} {what} reached for {scope}",
        metadata={"limit": limit, "limit_value": str(value), "scope": scope},
        retry_after_s=reset_s,
        quota=[(scope, f"{value} {what}")],
    )


def rate_limiter_unavailable() -> GatewayError:
    """UNAVAILABLE / RATE_LIMITER_UNAVAILABLE (fail-closed with the backend down), retry in 1 s."""
    return GatewayError(
        Reason.RATE_LIMITER_UNAVAILABLE,
        "the rate-limit backend is unavailable; try again shortly",
        retry_after_s=1.0,
    )


def model_unpriced(model: str, subject: str) -> GatewayError:
    """PERMISSION_DENIED / MODEL_UNPRICED: `model` has no catalog price, `subject` (`keys/{id}`
    or `teams/{id}`) has a budget and `budgets.unpriced_models` is "refuse". A policy on this
    credential, like MODEL_NOT_ALLOWED: retrying does not help (not RESOURCE_EXHAUSTED), and no
    budget was spent (not BUDGET_EXCEEDED); pricing the model (`models:`) or another key does."""
    return GatewayError(
        Reason.MODEL_UNPRICED,
        f"model {model!r} has no catalog price and {subject} has a budget: calls to unpriced models are refused "
        "under a budget (budgets.unpriced_models: refuse)",
        metadata={"model": model, "subject": subject},
    )


def api_key_revoked(key_id: str) -> GatewayError:
    """UNAUTHENTICATED / API_KEY_REVOKED: the key was revoked through the admin API (for good)."""
    return GatewayError(Reason.API_KEY_REVOKED, f"API key {key_id!r} was revoked", metadata={"key_id": key_id})


def key_store_unavailable(retry_after_s: float = 1.0) -> GatewayError:
    """UNAVAILABLE / KEY_STORE_UNAVAILABLE: the key is not in the key cache and the database did
    not answer within its timeout (RetryInfo `retry_after_s`)."""
    return GatewayError(
        Reason.KEY_STORE_UNAVAILABLE,
        "the key store is unavailable and this key is not cached; try again shortly",
        retry_after_s=retry_after_s,
    )


def budget_exceeded(
    subject: str, limit_usd: float, spend_usd: float, period: str, reset_s: float | None
) -> GatewayError:
    """RESOURCE_EXHAUSTED / BUDGET_EXCEEDED with QuotaFailure (subject `keys/{id}` or
    `teams/{id}`, description naming the period) and RetryInfo until the period starts over
    (`reset_s`, seconds; None for a lifetime budget: no RetryInfo).

    Args:
        period: "daily", "weekly", "monthly" or "total".
    """
    span = "lifetime" if period == "total" else period
    return GatewayError(
        Reason.BUDGET_EXCEEDED,
        f"{span} budget of {limit_usd:.6g} USD reached for {subject} (spent {spend_usd:.6g} USD)",
        metadata={
            "subject": subject,
            "period": period,
            "limit_usd": f"{limit_usd:.10g}",
            "spend_usd": f"{spend_usd:.10g}",
        },
        retry_after_s=reset_s,
        quota=[(subject, f"{span} budget of {limit_usd:.10g} USD")],
    )


def admin_key_invalid(message: str) -> GatewayError:
    """UNAUTHENTICATED / ADMIN_KEY_INVALID: no admin credential, or a wrong one."""
    return GatewayError(Reason.ADMIN_KEY_INVALID, message)


def not_an_admin_key() -> GatewayError:
    """PERMISSION_DENIED / NOT_AN_ADMIN_KEY: a data-plane key was sent to the admin API."""
    return GatewayError(
        Reason.NOT_AN_ADMIN_KEY, "this is a data-plane API key; the admin API needs an admin credential"
    )


def resource_not_found(name: str) -> GatewayError:
    """NOT_FOUND / RESOURCE_NOT_FOUND: no key or team named `name` (`keys/{id}`, `teams/{id}`)."""
    return GatewayError(Reason.RESOURCE_NOT_FOUND, f"{name} does not exist", metadata={"name": name})


def resource_already_exists(name: str, field: str, value: str) -> GatewayError:
    """ALREADY_EXISTS / RESOURCE_ALREADY_EXISTS: `field` (e.g. "display_name", "key_id") must be
    unique and `value` is taken (by `name`, when known)."""
    return GatewayError(
        Reason.RESOURCE_ALREADY_EXISTS,
        f"{field} {value!r} is already taken" + (f" by {name}" if name else ""),
        metadata={"name": name, "field": field, "value": value},
    )


def key_read_only(name: str) -> GatewayError:
    """FAILED_PRECONDITION / KEY_READ_ONLY: a key from the YAML file, changed only there."""
    return GatewayError(
        Reason.KEY_READ_ONLY,
        f"{name} comes from the gateway's configuration file; change it there",
        metadata={"name": name},
    )


def key_revoked_precondition(name: str) -> GatewayError:
    """FAILED_PRECONDITION / KEY_REVOKED: UpdateKey or RotateKey on a revoked key (revocation is
    permanent; create a new key instead)."""
    return GatewayError(
        Reason.KEY_REVOKED,
        f"{name} is revoked; a revoked key cannot be changed or rotated (create a new key)",
        metadata={"name": name},
    )


def team_not_empty(name: str, keys: int) -> GatewayError:
    """FAILED_PRECONDITION / TEAM_NOT_EMPTY: DeleteTeam while `keys` keys (not revoked) belong to it."""
    return GatewayError(
        Reason.TEAM_NOT_EMPTY,
        f"{name} still has {keys} key(s); revoke them or move them to another team first",
        metadata={"name": name, "keys": str(keys)},
    )


def quota_needs_shared_state() -> GatewayError:
    """FAILED_PRECONDITION / QUOTA_NEEDS_SHARED_STATE: an admin change would set rate limits or a
    budget that this gateway cannot enforce exactly (`serve --workers` > 1 without Redis: each
    worker would count alone, multiplying every limit by the number of workers)."""
    return GatewayError(
        Reason.QUOTA_NEEDS_SHARED_STATE,
        "rate limits and budgets need Redis (redis_url) when the gateway runs several workers: "
        "each worker would count alone",
    )


def store_unavailable(retry_after_s: float = 1.0) -> GatewayError:
    """UNAVAILABLE / STORE_UNAVAILABLE: the database did not answer an admin call within its
    timeout (RetryInfo `retry_after_s`)."""
    return GatewayError(
        Reason.STORE_UNAVAILABLE, "the database is unavailable; try again shortly", retry_after_s=retry_after_s
    )


def server_shutting_down() -> GatewayError:
    """UNAVAILABLE / SERVER_SHUTTING_DOWN: the drain's grace period ended before the call did;
    another replica can take it at once (RetryInfo 0 s)."""
    return GatewayError(
        Reason.SERVER_SHUTTING_DOWN,
        "the gateway is shutting down and its drain grace period ended before this call finished; retry it",
        retry_after_s=0.0,
    )


def internal_error(request_id: str) -> GatewayError:
    """INTERNAL / INTERNAL_ERROR for a bug: the request id only, never a stack trace."""
    return GatewayError(Reason.INTERNAL_ERROR, f"internal error; request id {request_id}")
