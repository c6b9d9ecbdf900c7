"""Hostile input at the boundary, defect by defect (found by an outside run of 6,000 generated
requests): every malformed request gets INVALID_ARGUMENT with the gateway's `google.rpc.Status`
and exactly one ErrorInfo, and no request can hurt another."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .conftest import Gateway, rich_error, user

SERVICE = "/llm_gateway.v1.LLMGatewayService/"


def _deep(node: struct_pb2.Struct, depth: int) -> None:
    """Nests `depth` Structs under `node`, in place (copying a message that deep fails)."""
    for _ in range(depth):
        node = node.fields["x"].struct_value


_METHODS = ("Chat", "ChatStream", "Embed", "ListModels", "GetModel", "CountTokens")
# Requests with a Struct field (tools[].parameters) at field 3 of the message: elsewhere the deep
# body's field 3 is an unknown field and decodes fine, so it is not a malformed body there.
_WITH_TOOLS = ("Chat", "ChatStream", "CountTokens")


def _cases() -> list[Any]:
    deep = pb.ChatRequest(model="m")
    tool = deep.tools.add(name="f")
    _deep(tool.parameters, 150)
    bodies = {
        "garbage": b"\xff\xff\xff\xff",
        "invalid-utf8-model": b"\x0a\x02\xc3\x28",
        "struct-past-depth-limit": deep.SerializeToString(),
        "length-past-end": b"\x0a\xff\xff\xff\xff\x0f",
    }
    return [
        pytest.param(method, body, id=f"{method}-{name}")
        for name, body in bodies.items()
        for method in _METHODS
        if name != "struct-past-depth-limit" or method in _WITH_TOOLS
    ]


@pytest.mark.parametrize(("method", "body"), _cases())
async def test_undecodable_requests_are_invalid_argument(gateway: Gateway, method: str, body: bytes) -> None:
    """Before: UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>", no ErrorInfo."""
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


def _status_bytes(error: grpc.aio.AioRpcError) -> int:
    return len(next(v for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin"))


async def test_a_thousand_violations_fit_in_the_status(gateway: Gateway) -> None:
    """Before: ~48 KB of BadRequest; the client saw RESOURCE_EXHAUSTED "Stream removed"."""
    tools = [pb.Tool(name=f"bad name {i}!") for i in range(1000)]
    request = pb.ChatRequest(model="m", messages=[user("hi")], tools=tools)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Chat(request)
    error = rich_error(caught.value)
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert error.bad_request is not None and 0 < len(error.bad_request.field_violations) <= 20
    listed = len(error.bad_request.field_violations)
    assert int(error.info.metadata["violations_omitted"]) == 1001 - listed  # 1000 names + "at most 128 tools"
    assert _status_bytes(caught.value) <= 4096


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda stub: stub.GetModel(pb.GetModelRequest(name="models/" + "m" * 100_000)), id="get-model"),
        pytest.param(
            lambda stub: stub.Chat(
                pb.ChatRequest(model="m", messages=[user("hi")], routing=pb.RoutingOptions(provider="p" * 100_000))
            ),
            id="routing-provider",
        ),
        pytest.param(
            lambda stub: stub.Chat(pb.ChatRequest(model="é" * 100_000, messages=[user("hi")])), id="model-unicode"
        ),
    ],
)
async def test_huge_echoed_values_are_clipped(gateway: Gateway, call: Any) -> None:
    """Before: a 100,000-character name echoed in the message and ErrorInfo: "Stream removed"."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(gateway.stub)
    error = rich_error(caught.value)
    assert error.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert _status_bytes(caught.value) <= 4096
    assert len(error.message.encode()) <= 512
    assert all(len(v) <= 256 for v in error.info.metadata.values())


async def test_count_tokens_on_a_million_characters(gateway: Gateway) -> None:
    """Before: INTERNAL (bpe_openai "Input too long to encode safely"); Chat with it was fine."""
    text = "lorem ipsum dolor sit amet " * 40_000  # 1,080,000 characters
    reply = await gateway.stub.CountTokens(pb.CountTokensRequest(model="gpt-4o-mini", messages=[user(text)]))
    assert reply.method == pb.TOKEN_COUNT_METHOD_TOKENIZER
    assert 150_000 < reply.input_tokens < 300_000


async def test_embed_inputs_times_dimensions_is_bounded(gateway: Gateway, openai_upstream: Any) -> None:
    """Before: 2048 inputs x 16384 dimensions was valid; ~20 s and ~0.5 GB later the gateway failed
    with "Sent message larger than max" and no ErrorInfo. Now refused before any upstream call."""
    request = pb.EmbedRequest(model="text-embedding-3-small", inputs=["x"] * 2048, dimensions=16384)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Embed(request)
    error = rich_error(caught.value)
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert error.bad_request is not None and error.bad_request.field_violations[0].field == "dimensions"
    assert "4194304" in error.bad_request.field_violations[0].description
    assert not openai_upstream.calls("/embeddings")


async def test_an_embed_answer_past_the_message_limit_is_refused_with_its_reason(
    make_gateway: Any, openai_upstream: Any
) -> None:
    """Without `dimensions` the answer's size is known only once it arrives: past
    max_message_bytes it is INVALID_ARGUMENT naming the limit, not "Sent message larger than max"."""
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": openai_upstream.base_url}
    gateway = await make_gateway(env, max_message_bytes=4096)
    request = pb.EmbedRequest(model="text-embedding-3-small", inputs=["x"] * 400)  # 400 x 4 floats
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Embed(request)
    error = rich_error(caught.value)
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert "max_message_bytes (4096)" in error.bad_request.field_violations[0].description  # type: ignore[union-attr]


async def test_calls_cut_at_the_end_of_the_drain_get_a_status(make_gateway: Any, openai_upstream: Any) -> None:
    """Found from outside: a stream still running when the drain's grace period ended was dropped
    with no `google.rpc.Status`. Now it (and a unary call) ends UNAVAILABLE / SERVER_SHUTTING_DOWN."""
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": openai_upstream.base_url}
    gateway = await make_gateway(env, grace_period_s=1.0)
    stream = gateway.stub.ChatStream(pb.ChatStreamRequest(model="stall-stream", messages=[user("hi")]))
    first = await stream.read()
    assert first.WhichOneof("event") == "delta"
    unary = asyncio.ensure_future(gateway.stub.Chat(pb.ChatRequest(model="hang", messages=[user("hi")])))
    await asyncio.sleep(0.2)
    stopping = asyncio.ensure_future(gateway.running.stop())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    for error in (rich_error(caught.value), rich_error(await _failure(unary))):
        assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")
        assert error.retry is not None
    await stopping


async def _failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["tool", "schema", "count-tokens"])
async def test_non_finite_numbers_in_a_struct_are_invalid_argument(gateway: Gateway, number: float, where: str) -> None:
    """Before: INTERNAL (json_format.MessageToDict raised ValueError)."""
    tool = pb.Tool(name="f")
    tool.parameters.fields["type"].string_value = "object"
    tool.parameters.fields["properties"].struct_value.fields["n"].struct_value.fields["maximum"].number_value = number
    if where == "tool":
        call = gateway.stub.Chat(pb.ChatRequest(model="gpt-4o-mini", messages=[user("hi")], tools=[tool]))
        field = "tools[0].parameters"
    elif where == "schema":
        fmt = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA)
        fmt.json_schema.schema.CopyFrom(tool.parameters)
        request = pb.ChatRequest(model="gpt-4o-mini", messages=[user("hi")])
        request.generation.response_format.CopyFrom(fmt)
        call = gateway.stub.Chat(request)
        field = "generation.response_format.json_schema.schema"
    else:
        call = gateway.stub.CountTokens(pb.CountTokensRequest(model="gpt-4o-mini", messages=[user("hi")], tools=[tool]))
        field = "tools[0].parameters"
    error = rich_error(await _failure(call))
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert error.bad_request is not None and [f.field for f in error.bad_request.field_violations] == [field]


@pytest.mark.parametrize("offset", ["Infinity", "1e400", "true", '"7"', "1.5"])
async def test_a_forged_page_token_is_invalid_argument(gateway: Gateway, offset: str) -> None:
    """Found by the hostile-input suite: a token whose offset was Infinity raised OverflowError (INTERNAL)."""
    import base64

    token = base64.urlsafe_b64encode(f'{{"o":{offset},"f":"|"}}'.encode()).decode().rstrip("=")
    error = rich_error(await _failure(gateway.stub.ListModels(pb.ListModelsRequest(page_token=token))))
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")


async def test_list_models_with_an_unknown_capability_is_invalid_argument(gateway: Gateway) -> None:
    """Found from outside: an unknown capability value answered an unfiltered list."""
    error = rich_error(await _failure(gateway.stub.ListModels(pb.ListModelsRequest(capability=999))))
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert error.bad_request is not None and error.bad_request.field_violations[0].field == "capability"
