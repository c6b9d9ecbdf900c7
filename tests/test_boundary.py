"""Hostile input at the boundary, defect by defect (found by an outside run of 6,000 generated
requests): every malformed request gets INVALID_ARGUMENT with the gateway's `google.rpc.Status`
and exactly one ErrorInfo, and no request can hurt another."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .conftest import Gateway, rich_error

SERVICE = "/llm_gateway.v1.LLMGatewayService/"


def _deep(node: struct_pb2.Struct, depth: int) -> None:
    """Nests `depth` Structs under `node`, in place (copying a message that deep fails)."""
    for _ in range(depth):
        node = node.fields["x"].struct_value


def _bodies() -> list[pytest.ParameterSet]:
    deep = pb.ChatRequest(model="m")
    tool = deep.tools.add(name="f")
    _deep(tool.parameters, 150)
    return [
        pytest.param(b"\xff\xff\xff\xff", id="garbage"),
        pytest.param(b"\x0a\x02\xc3\x28", id="invalid-utf8-model"),
        pytest.param(deep.SerializeToString(), id="struct-past-depth-limit"),
        pytest.param(b"\x0a\xff\xff\xff\xff\x0f", id="length-past-end"),
    ]


@pytest.mark.parametrize("body", _bodies())
@pytest.mark.parametrize("method", ["Chat", "ChatStream", "Embed", "ListModels", "GetModel", "CountTokens"])
async def test_undecodable_requests_are_invalid_argument(gateway: Gateway, method: str, body: bytes) -> None:
    """Before: UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>", no ErrorInfo."""
    if len(body) > 100 and method in ("Embed", "ListModels", "GetModel"):
        pytest.skip("the deep Struct sits in a field these messages do not have (skipped as unknown)")
    if method == "ChatStream":
        call = gateway.channel.unary_stream(SERVICE + method)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call(body):
                pass
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.channel.unary_unary(SERVICE + method)(body)
    error = rich_error(caught.value)
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert error.info.metadata["request_bytes"] == str(len(body))
    # the server is fine and the next normal call works
    await gateway.stub.ListModels(pb.ListModelsRequest(page_size=1))
