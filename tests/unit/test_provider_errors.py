"""Table tests of `providers.errors`: the whole upstream HTTP status table (SPEC §7), upstream-code
overrides, messages and metadata, the transport failures, and `parse_retry_after`
(shared/reference/provider-wire-formats.md §1.1, §3.1, §5.4)."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable

import pytest

from llm_gateway_server.errors import GatewayError
from llm_gateway_server.providers import errors


def _name(value: object) -> str:
    """An error code or reason as its UPPER_SNAKE name, whether a string or an enum."""
    return str(getattr(value, "name", value))


def _value(value: object) -> str:
    return str(getattr(value, "value", value))


def _classified(err: GatewayError) -> tuple[str, str, bool, bool]:
    return (_name(err.code), _value(err.reason), err.retryable, err.fallback)


REJECTED = ("INVALID_ARGUMENT", "PROVIDER_REJECTED", False, False)
FILTERED = ("INVALID_ARGUMENT", "CONTENT_FILTERED", False, False)
AUTH = ("INTERNAL", "PROVIDER_AUTH_FAILED", False, True)
QUOTA = ("RESOURCE_EXHAUSTED", "PROVIDER_QUOTA_EXHAUSTED", False, True)
NOT_FOUND = ("NOT_FOUND", "MODEL_NOT_FOUND", False, True)
RATE_LIMITED = ("RESOURCE_EXHAUSTED", "PROVIDER_RATE_LIMITED", True, True)
UNAVAILABLE = ("UNAVAILABLE", "PROVIDER_UNAVAILABLE", True, True)


# --- from_http_status: the status table --------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "upstream_code", "expected"),
    [
        # listed rows
        pytest.param(400, "", REJECTED, id="400"),
        pytest.param(401, "", AUTH, id="401"),
        pytest.param(402, "", QUOTA, id="402-billing"),
        pytest.param(403, "", AUTH, id="403"),
        pytest.param(404, "", NOT_FOUND, id="404"),
        pytest.param(408, "", UNAVAILABLE, id="408"),
        pytest.param(409, "", UNAVAILABLE, id="409"),
        pytest.param(413, "", REJECTED, id="413"),
        pytest.param(422, "", REJECTED, id="422"),
        pytest.param(429, "", RATE_LIMITED, id="429"),
        pytest.param(498, "", UNAVAILABLE, id="498-groq-flex-capacity"),
        pytest.param(499, "", UNAVAILABLE, id="499-cancelled-upstream"),
        pytest.param(500, "", UNAVAILABLE, id="500"),
        # unlisted 4xx take 400's row, unlisted 5xx take 500's
        pytest.param(405, "", REJECTED, id="405-as-400"),
        pytest.param(410, "", REJECTED, id="410-as-400"),
        pytest.param(412, "", REJECTED, id="412-as-400"),
        pytest.param(424, "", REJECTED, id="424-as-400"),
        pytest.param(431, "", REJECTED, id="431-as-400"),
        pytest.param(501, "", UNAVAILABLE, id="501-as-500"),
        pytest.param(502, "", UNAVAILABLE, id="502-as-500"),
        pytest.param(503, "", UNAVAILABLE, id="503-as-500"),
        pytest.param(504, "", UNAVAILABLE, id="504-as-500"),
        pytest.param(529, "", UNAVAILABLE, id="529-anthropic-overloaded"),
        # an error reported inside a 200 stream
        pytest.param(-1, "", UNAVAILABLE, id="in-stream"),
        pytest.param(-1, "server_error", UNAVAILABLE, id="in-stream-server-error"),
        # upstream codes that refine the row
        pytest.param(400, "context_length_exceeded", REJECTED, id="400-context-length"),
        pytest.param(400, "string_above_max_length", REJECTED, id="400-string-above-max-length"),
        pytest.param(413, "request_too_large", REJECTED, id="413-anthropic-request-too-large"),
        pytest.param(500, "context_length_exceeded", REJECTED, id="context-length-code-wins-over-5xx"),
        pytest.param(-1, "context_length_exceeded", REJECTED, id="in-stream-context-length"),
        pytest.param(400, "content_filter", FILTERED, id="400-content-filter"),
        pytest.param(400, "content_policy_violation", FILTERED, id="400-content-policy-violation"),
        pytest.param(400, "moderation_blocked", FILTERED, id="400-moderation-blocked"),
        pytest.param(-1, "content_filter", FILTERED, id="in-stream-content-filter"),
        pytest.param(400, "Content_Policy_Violation", FILTERED, id="codes-are-case-insensitive"),
        pytest.param(429, "insufficient_quota", QUOTA, id="429-insufficient-quota"),
        pytest.param(429, "billing_hard_limit_reached", QUOTA, id="429-billing-hard-limit"),
        pytest.param(429, "INSUFFICIENT_QUOTA", QUOTA, id="429-quota-any-case"),
        pytest.param(400, "insufficient_quota", REJECTED, id="quota-code-only-counts-on-429"),
        pytest.param(429, "rate_limit_exceeded", RATE_LIMITED, id="429-rate-limit-exceeded"),
        pytest.param(429, "rate_limit_error", RATE_LIMITED, id="429-anthropic-rate-limit"),
        pytest.param(401, "invalid_api_key", AUTH, id="401-invalid-api-key"),
        pytest.param(401, "authentication_error", AUTH, id="401-anthropic"),
        pytest.param(403, "permission_error", AUTH, id="403-anthropic"),
        pytest.param(404, "model_not_found", NOT_FOUND, id="404-model-not-found"),
        pytest.param(402, "billing_error", QUOTA, id="402-anthropic-billing"),
        pytest.param(400, "invalid_request_error", REJECTED, id="400-invalid-request"),
        pytest.param(503, "server_is_overloaded", UNAVAILABLE, id="503-overloaded"),
        pytest.param(529, "overloaded_error", UNAVAILABLE, id="529-overloaded-error"),
    ],
)
def test_from_http_status(status: int, upstream_code: str, expected: tuple[str, str, bool, bool]) -> None:
    err = errors.from_http_status("openai", "gpt-4o", status, "upstream says no", upstream_code=upstream_code)
    assert _classified(err) == expected


@pytest.mark.parametrize(
    ("status", "upstream_code", "retry_after_s", "expected"),
    [
        pytest.param(429, "", 2.5, 2.5, id="rate-limited-keeps-delay"),
        pytest.param(429, "", None, None, id="rate-limited-no-delay"),
        pytest.param(503, "", 1.0, 1.0, id="unavailable-keeps-delay"),
        pytest.param(529, "overloaded_error", 0.01, 0.01, id="overloaded-keeps-delay"),
        pytest.param(400, "", 5.0, None, id="not-retryable-drops-delay"),
        pytest.param(401, "", 5.0, None, id="auth-drops-delay"),
        pytest.param(429, "insufficient_quota", 5.0, None, id="quota-drops-delay"),
        pytest.param(400, "content_filter", 5.0, None, id="content-filter-drops-delay"),
    ],
)
def test_from_http_status_retry_after(
    status: int, upstream_code: str, retry_after_s: float | None, expected: float | None
) -> None:
    err = errors.from_http_status("p", "m", status, "x", upstream_code=upstream_code, retry_after_s=retry_after_s)
    assert err.retry_after_s == expected


@pytest.mark.parametrize(
    ("status", "upstream_code", "metadata"),
    [
        pytest.param(
            429,
            "rate_limit_exceeded",
            {
                "provider": "groq",
                "model": "llama-3.1-8b-instant",
                "upstream_status": "429",
                "upstream_code": "rate_limit_exceeded",
            },
            id="with-code",
        ),
        pytest.param(
            500, "", {"provider": "groq", "model": "llama-3.1-8b-instant", "upstream_status": "500"}, id="without-code"
        ),
        pytest.param(
            -1,
            "overloaded_error",
            {
                "provider": "groq",
                "model": "llama-3.1-8b-instant",
                "upstream_status": "0",
                "upstream_code": "overloaded_error",
            },
            id="in-stream-status-0",
        ),
    ],
)
def test_from_http_status_metadata(status: int, upstream_code: str, metadata: dict[str, str]) -> None:
    err = errors.from_http_status("groq", "llama-3.1-8b-instant", status, "x", upstream_code=upstream_code)
    assert dict(err.metadata) == metadata


@pytest.mark.parametrize(
    ("status", "upstream_message", "contains", "excludes"),
    [
        pytest.param(
            429,
            "Rate limit reached for gpt-4o",
            ["'openai'", "HTTP 429", "'gpt-4o'", "Rate limit reached for gpt-4o"],
            [],
            id="names-provider-status-model-and-upstream-message",
        ),
        pytest.param(-1, "Overloaded", ["an error inside the stream", "Overloaded"], ["HTTP"], id="in-stream-wording"),
        pytest.param(
            401,
            "Incorrect API key provided: sk-abc***xyz",
            ["HTTP 401", "API key"],
            ["sk-abc", "Incorrect"],
            id="auth-failure-never-echoes-upstream-message",
        ),
        pytest.param(
            403, "key sk-live-SECRET is blocked", ["HTTP 403"], ["SECRET"], id="403-never-echoes-upstream-message"
        ),
        pytest.param(500, "", ["no message"], [], id="empty-message"),
        pytest.param(400, "line one\n\n   line\ttwo", ["line one line two"], ["\n", "\t"], id="whitespace-collapsed"),
    ],
)
def test_from_http_status_message(status: int, upstream_message: str, contains: list[str], excludes: list[str]) -> None:
    err = errors.from_http_status("openai", "gpt-4o", status, upstream_message)
    text = str(err)
    assert all(part in text for part in contains), text
    assert not any(part in text for part in excludes), text


def test_from_http_status_clips_long_messages() -> None:
    err = errors.from_http_status("openai", "gpt-4o", 400, "x" * 5000)
    text = str(err)
    assert "x" * 499 + "…" in text
    assert "x" * 500 not in text


# --- transport failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected", "failure"),
    [
        pytest.param(
            lambda: errors.connection_failed("ollama", "llama3.2", "Failed to connect to Ollama"),
            ("UNAVAILABLE", "PROVIDER_UNAVAILABLE", True, True),
            "connection",
            id="connection-failed",
        ),
        pytest.param(
            lambda: errors.upstream_timeout("ollama", "llama3.2", 2.5),
            ("UNAVAILABLE", "PROVIDER_UNAVAILABLE", True, True),
            "timeout",
            id="upstream-timeout",
        ),
        pytest.param(
            lambda: errors.bad_response("ollama", "llama3.2", "the stream ended before its final (done) line"),
            ("UNAVAILABLE", "PROVIDER_BAD_RESPONSE", True, True),
            "bad_response",
            id="bad-response",
        ),
    ],
)
def test_transport_failures(
    make: Callable[[], GatewayError], expected: tuple[str, str, bool, bool], failure: str
) -> None:
    err = make()
    assert _classified(err) == expected
    assert err.metadata["failure"] == failure
    assert (err.metadata["provider"], err.metadata["model"]) == ("ollama", "llama3.2")
    assert "'ollama'" in str(err)
    assert "'llama3.2'" in str(err)


def test_upstream_timeout_names_the_timeout() -> None:
    assert "2.5s" in str(errors.upstream_timeout("p", "m", 2.5))


# --- parse_retry_after -----------------------------------------------------------------------


def _http_date(offset_s: float) -> str:
    return email.utils.formatdate(time.time() + offset_s, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(None, None, id="no-headers"),
        pytest.param({}, None, id="empty-headers"),
        pytest.param({"x-request-id": "req_1"}, None, id="no-retry-headers"),
        # retry-after-ms first
        pytest.param({"retry-after-ms": "10"}, 0.01, id="ms"),
        pytest.param({"retry-after-ms": "1500"}, 1.5, id="ms-over-a-second"),
        pytest.param({"retry-after-ms": "2.5"}, 0.0025, id="ms-fractional"),
        pytest.param({"retry-after-ms": "250", "retry-after": "9"}, 0.25, id="ms-wins-over-seconds"),
        pytest.param({"retry-after-ms": "soon", "retry-after": "2"}, 2.0, id="garbage-ms-falls-back-to-seconds"),
        pytest.param({"retry-after-ms": "", "retry-after": "3"}, 3.0, id="empty-ms-falls-back-to-seconds"),
        pytest.param({"retry-after-ms": "soon"}, None, id="garbage-ms-alone"),
        # retry-after seconds
        pytest.param({"retry-after": "2"}, 2.0, id="seconds"),
        pytest.param({"retry-after": "0.01"}, 0.01, id="fractional-seconds"),
        pytest.param({"retry-after": " 5 "}, 5.0, id="seconds-with-spaces"),
        pytest.param({"retry-after": "0"}, 0.0, id="zero"),
        pytest.param({"retry-after": "-3"}, 0.0, id="negative-clamped-to-zero"),
        pytest.param({"retry-after-ms": "-100"}, 0.0, id="negative-ms-clamped-to-zero"),
        # header names are case-insensitive
        pytest.param({"Retry-After": "4"}, 4.0, id="title-case"),
        pytest.param({"RETRY-AFTER-MS": "20"}, 0.02, id="upper-case-ms"),
        # HTTP date
        pytest.param({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0, id="http-date-in-the-past"),
        # garbage
        pytest.param({"retry-after": "soon"}, None, id="garbage"),
        pytest.param({"retry-after": ""}, None, id="empty"),
        pytest.param({"retry-after": "Someday, 99 Foo 20xx"}, None, id="garbage-date"),
        # caps
        pytest.param({"retry-after": "500"}, 300.0, id="seconds-capped"),
        pytest.param({"retry-after": "1e3"}, 300.0, id="exponent-capped"),
        pytest.param({"retry-after": "inf"}, 300.0, id="infinity-capped"),
        pytest.param({"retry-after-ms": "600000"}, 300.0, id="ms-capped"),
        pytest.param({"retry-after": "300"}, 300.0, id="exactly-the-cap"),
        pytest.param(
            {"retry-after": "nan"},
            None,
            id="nan-seconds",
        ),
        pytest.param(
            {"retry-after-ms": "NaN"},
            None,
            id="nan-ms",
        ),
    ],
)
def test_parse_retry_after(headers: dict[str, str] | None, expected: float | None) -> None:
    result = errors.parse_retry_after(headers)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


@pytest.mark.parametrize(
    ("headers", "cap_s", "expected"),
    [
        pytest.param({"retry-after": "120"}, 60.0, 60.0, id="custom-cap"),
        pytest.param({"retry-after": "30"}, 60.0, 30.0, id="under-custom-cap"),
        pytest.param({"retry-after-ms": "90000"}, 60.0, 60.0, id="ms-custom-cap"),
        pytest.param({"retry-after": "5"}, 0.0, 0.0, id="zero-cap"),
    ],
)
def test_parse_retry_after_cap(headers: dict[str, str], cap_s: float, expected: float) -> None:
    assert errors.parse_retry_after(headers, cap_s=cap_s) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("offset_s", "cap_s", "expected"),
    [
        pytest.param(60, 300.0, 60.0, id="future-date"),
        pytest.param(3600, 300.0, 300.0, id="far-future-date-capped"),
        pytest.param(-60, 300.0, 0.0, id="past-date"),
    ],
)
def test_parse_retry_after_http_date(offset_s: float, cap_s: float, expected: float) -> None:
    result = errors.parse_retry_after({"retry-after": _http_date(offset_s)}, cap_s=cap_s)
    assert result == pytest.approx(expected, abs=2.0)  # HTTP dates have one-second resolution
