"""The one mapping from `GatewayError` to a gRPC status with `google.rpc.Status` details.

Trailers carry `grpc-status-details-bin` (a `google.rpc.Status` with exactly one `ErrorInfo`,
plus `RetryInfo` / `BadRequest` when they apply) and `x-request-id`.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..errors import ERROR_DOMAIN, GatewayError
from .call_record import current_call

# Bounds on what a status echoes, so the whole `google.rpc.Status` (and the `grpc-message`
# header) stays far below the 8-16 KiB of trailing metadata default gRPC clients accept: past it a
# client sees RESOURCE_EXHAUSTED "Stream removed" instead of the error.
MAX_STATUS_BYTES = 3072  # the serialized google.rpc.Status (base64 in the trailer: ~4 KiB)
MAX_MESSAGE_BYTES = 512  # the status message, UTF-8 (percent-encoded in `grpc-message`)
MAX_VALUE_CHARS = 256  # each ErrorInfo metadata value, violation field and description
MAX_VIOLATIONS = 20  # BadRequest field violations listed


def _clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clip_bytes(text: str, limit: int) -> str:
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode(errors="ignore") + "…"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _build(error: GatewayError, request_id: str, violations: int) -> status_pb2.Status:
    """The status with at most `violations` field violations (the rest counted, not listed)."""
    listed = error.violations[:violations]
    metadata = {_clip(k, 64): _clip(v) for k, v in error.metadata.items()}
    if len(listed) < len(error.violations):
        metadata["violations_omitted"] = str(len(error.violations) - len(listed))
    metadata["request_id"] = request_id
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason.value, domain=ERROR_DOMAIN, metadata=metadata))]
    if error.retry_after_s is not None:
        seconds = min(max(error.retry_after_s, 0.0), 86_400.0)
        delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if error.quota:
        quota = [
            error_details_pb2.QuotaFailure.Violation(subject=_clip(s), description=_clip(d))
            for s, d in error.quota[:MAX_VIOLATIONS]
        ]
        details.append(_pack(error_details_pb2.QuotaFailure(violations=quota)))
    if listed:
        fields = [
            error_details_pb2.BadRequest.FieldViolation(field=_clip(v.field), description=_clip(v.description))
            for v in listed
        ]
        details.append(_pack(error_details_pb2.BadRequest(field_violations=fields)))
    message = _clip_bytes(error.message, MAX_MESSAGE_BYTES)
    return status_pb2.Status(code=code_pb2.Code.Value(error.code.name), message=message, details=details)


def to_status(error: GatewayError, request_id: str) -> grpc.Status:
    """Builds the rich status for `error`; `request_id` goes into ErrorInfo.metadata.

    Every echoed value is clipped (`MAX_VALUE_CHARS`, `MAX_MESSAGE_BYTES`) and at most
    `MAX_VIOLATIONS` field violations are listed — fewer when needed to keep the serialized status
    within `MAX_STATUS_BYTES`; ErrorInfo.metadata `violations_omitted` says how many were left out.
    """
    violations = min(len(error.violations), MAX_VIOLATIONS)
    status = _build(error, request_id, violations)
    while violations and status.ByteSize() > MAX_STATUS_BYTES:
        violations //= 2
        status = _build(error, request_id, violations)
    return rpc_status.to_status(status)


async def abort(
    context: grpc.aio.ServicerContext,
    error: GatewayError,
    request_id: str,
    extra_trailers: tuple[tuple[str, str], ...] = (),
) -> NoReturn:
    """Ends the call with `error` (raises, as `context.abort` does); the outcome is noted on the
    call record for the interceptors."""
    call = current_call.get()
    if call is not None:
        call.outcome.fail(error)
    status = to_status(error, request_id)
    trailers = (*status.trailing_metadata, ("x-request-id", request_id), *extra_trailers)
    await context.abort(status.code, status.details, trailers)
    raise AssertionError("context.abort returned")  # grpc.aio raises; this keeps the NoReturn promise
