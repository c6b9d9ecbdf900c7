"""Tolerant request decoding: a request body that is not a valid message of its type (garbage
bytes, invalid UTF-8 in a string field, nesting past the protobuf runtime's depth limit) decodes
to a `MalformedRequest` instead of raising inside gRPC — which would answer
`UNKNOWN "Unexpected <class 'DecodeError'>"` with no details. The outermost interceptor answers it
INVALID_ARGUMENT / MALFORMED_REQUEST with the gateway's `google.rpc.Status`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import message as pb_message

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc

# What the protobuf runtime raises for an undecodable body (upb: DecodeError; a pure-Python
# runtime may raise RecursionError for deep nesting, or UnicodeDecodeError / ValueError).
_DECODE_ERRORS = (pb_message.DecodeError, RecursionError, UnicodeDecodeError, ValueError)
_DETAIL_MAX_CHARS = 200


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """A request body that did not decode as `message_type` (`detail`: the runtime's message,
    clipped to 200 characters; `size`: the body's length in bytes)."""

    message_type: str
    detail: str
    size: int


def tolerant(message_type: type[pb_message.Message]) -> Callable[[bytes], pb_message.Message | MalformedRequest]:
    """A request deserializer for `message_type` that never raises (see module docstring)."""
    parse = message_type.FromString
    name = message_type.DESCRIPTOR.full_name

    def deserialize(raw: bytes) -> pb_message.Message | MalformedRequest:
        try:
            return parse(raw)
        except _DECODE_ERRORS as exc:
            return MalformedRequest(name, str(exc)[:_DETAIL_MAX_CHARS], len(raw))

    return deserialize


def add_gateway_service(servicer: pb_grpc.LLMGatewayServiceServicer, server: grpc.aio.Server) -> None:
    """Registers `servicer` for `llm_gateway.v1.LLMGatewayService` like the generated
    `add_LLMGatewayServiceServicer_to_server`, with tolerant request deserializers."""
    service = pb.DESCRIPTOR.services_by_name["LLMGatewayService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        factory = (
            grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=tolerant(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
