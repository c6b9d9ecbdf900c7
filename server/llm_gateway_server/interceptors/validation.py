"""Request validation at the boundary, before anything is counted, reserved or cached.

Runs right after authentication: an undecodable body (`transport.decoding.MalformedRequest`) is
INVALID_ARGUMENT / MALFORMED_REQUEST; an invalid Chat, ChatStream, Embed, CountTokens or
ListModels request is INVALID_ARGUMENT / INVALID_REQUEST with every field violation
(`transport.validation`). So the rate limiter never reserves tokens for a request that cannot
run (a negative `max_output_tokens` once reserved a negative amount and poisoned the key's
tokens-per-minute window), and the cache never keys an invalid request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from llm_gateway.v1 import llm_gateway_pb2 as pb

from ..errors import malformed_request
from ..transport import validation
from ..transport.call_record import current_call
from ..transport.decoding import MalformedRequest
from .base import AdmissionInterceptor

# Requests whose `model` and `end_user_id` the call record notes for the usage ledger.
_NAMED = (pb.ChatRequest, pb.ChatStreamRequest, pb.EmbedRequest)

_CHECKS: dict[type[Any], Callable[[Any], None]] = {
    pb.ChatRequest: validation.check_chat,
    pb.ChatStreamRequest: validation.check_chat,
    pb.EmbedRequest: validation.check_embed,
    pb.CountTokensRequest: validation.check_count_tokens,
    pb.ListModelsRequest: validation.check_list_models,
}


def check(request: object) -> None:
    """Validates one request of the gateway service.

    Raises:
        GatewayError: MALFORMED_REQUEST for an undecodable body, INVALID_REQUEST for invalid fields.
    """
    if isinstance(request, MalformedRequest):
        raise malformed_request(request.message_type, request.detail, request.size)
    checker = _CHECKS.get(type(request))
    if checker is not None:
        checker(request)


class ValidationInterceptor(AdmissionInterceptor):
    """Refuses malformed and invalid requests (see module docstring)."""

    def admit(self, context: grpc.aio.ServicerContext[Any, Any], request: Any) -> None:
        """Notes the request's model and end-user id on the call record (clipped to their
        limits, before the check: a refused call is recorded with them too), then raises
        GatewayError for a malformed or invalid request (see `check`)."""
        if isinstance(request, _NAMED):
            record = current_call.get()
            if record is not None:
                record.model = request.model[: validation.MAX_MODEL_CHARS]
                record.end_user_id = request.end_user_id[: validation.MAX_END_USER_CHARS]
        check(request)
