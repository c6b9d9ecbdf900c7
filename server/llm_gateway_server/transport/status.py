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


def to_status(error: GatewayError, request_id: str) -> grpc.Status:
    """Builds the rich status for `error`; `request_id` goes into ErrorInfo.metadata."""
    details: list[any_pb2.Any] = []
    info = error_details_pb2.ErrorInfo(
        reason=error.reason.value, domain=ERROR_DOMAIN, metadata={**error.metadata, "request_id": request_id}
    )
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if error.retry_after_s is not None:
        seconds = max(error.retry_after_s, 0.0)
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
        )
        packed = any_pb2.Any()
        packed.Pack(retry)
        details.append(packed)
    if error.quota:
        quota = error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=s, description=d) for s, d in error.quota]
        )
        packed = any_pb2.Any()
        packed.Pack(quota)
        details.append(packed)
    if error.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    status = status_pb2.Status(code=code_pb2.Code.Value(error.code.name), message=error.message, details=details)
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
