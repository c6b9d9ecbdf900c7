"""`GatewayError` is immutable: `with_metadata` / `with_code` return copies and leave the original
as it was; setting an attribute raises. The executor relies on this when it adds `attempts`,
`chunks_sent`, provider and model to an adapter's error."""

from __future__ import annotations

import pickle

import grpc
import pytest

from llm_gateway_server.errors import GatewayError, Reason, stream_ended_early
from llm_gateway_server.providers.errors import connection_failed, from_http_status


def original() -> GatewayError:
    return from_http_status("fake-a", "alpha-v1", 503, "busy", retry_after_s=2.5)


def test_with_metadata_returns_a_copy_and_leaves_the_original() -> None:
    error = original()
    before = dict(error.metadata)
    copy = error.with_metadata(attempts="fake-a/alpha-v1:PROVIDER_UNAVAILABLE", chunks_sent="0")
    assert copy is not error
    assert dict(error.metadata) == before
    assert copy.metadata["attempts"] == "fake-a/alpha-v1:PROVIDER_UNAVAILABLE"
    assert copy.metadata["chunks_sent"] == "0"
    assert (copy.reason, copy.code, copy.message, copy.retry_after_s, copy.retryable, copy.fallback) == (
        error.reason,
        error.code,
        error.message,
        error.retry_after_s,
        error.retryable,
        error.fallback,
    )


def test_with_metadata_keeps_existing_entries_and_returns_self_when_nothing_changes() -> None:
    error = original()
    assert error.with_metadata(provider="other").metadata["provider"] == "fake-a"
    assert error.with_metadata(provider="other") is error
    assert error.with_metadata() is error


def test_with_code_returns_a_copy_and_leaves_the_original() -> None:
    error = from_http_status("fake-a", "alpha-v1", 400, "bad")
    copy = error.with_code(grpc.StatusCode.UNAVAILABLE)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert copy.code is grpc.StatusCode.UNAVAILABLE
    assert copy.reason is Reason.PROVIDER_REJECTED  # the reason stays
    assert dict(copy.metadata) == dict(error.metadata)
    assert error.with_code(grpc.StatusCode.INVALID_ARGUMENT) is error


@pytest.mark.parametrize("name", ["reason", "code", "metadata", "retry_after_s", "retryable", "fallback", "_f", "new"])
def test_setting_an_attribute_raises(name: str) -> None:
    error = original()
    with pytest.raises(AttributeError):
        setattr(error, name, None)
    assert error.reason is Reason.PROVIDER_UNAVAILABLE and error.retry_after_s == 2.5


def test_metadata_is_read_only() -> None:
    error = connection_failed("fake-a", "alpha-v1", "reset")
    with pytest.raises(TypeError):
        error.metadata["provider"] = "other"  # type: ignore[index]
    assert error.metadata["provider"] == "fake-a"


def test_copies_do_not_share_metadata() -> None:
    error = stream_ended_early("fake-a", "alpha-v1", 0)
    first, second = error.with_metadata(attempts="one"), error.with_metadata(attempts="two")
    assert (first.metadata["attempts"], second.metadata["attempts"]) == ("one", "two")
    assert "attempts" not in error.metadata


def test_raising_and_chaining_still_work() -> None:
    error = original()
    with pytest.raises(GatewayError) as raised:
        try:
            raise ValueError("inner")
        except ValueError as exc:
            raise error from exc
    assert raised.value is error and isinstance(error.__cause__, ValueError)
    error.add_note("a note")  # __notes__ belongs to the exception machinery
    assert error.__notes__ == ["a note"]


def test_pickles_as_an_equal_immutable_copy() -> None:
    error = original().with_metadata(attempts="x")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.code, dict(copy.metadata), copy.retry_after_s) == (
        error.reason,
        error.code,
        dict(error.metadata),
        error.retry_after_s,
    )
    with pytest.raises(AttributeError):
        copy.code = grpc.StatusCode.OK  # type: ignore[misc]
