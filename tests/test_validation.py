"""Bad input: explicit field violations, routing errors, and property-based requests that must
never crash the server (every answer is OK or a status with exactly one ErrorInfo)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .conftest import Gateway, chat, expect_error, rich_error, user


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ChatRequest(messages=[user("x")]), "model"),
        (pb.ChatRequest(model="m"), "messages"),
        (pb.ChatRequest(model="m", messages=[pb.Message(content=[pb.ContentPart(text="x")])]), "messages[0].role"),
        (pb.ChatRequest(model="m", messages=[pb.Message(role=pb.ROLE_USER)]), "messages[0].content"),
        (
            pb.ChatRequest(model="m", messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart()])]),
            "messages[0].content[0]",
        ),
        (
            pb.ChatRequest(model="m", messages=[pb.Message(role=pb.ROLE_TOOL, content=[pb.ContentPart(text="r")])]),
            "messages[0].tool_call_id",
        ),
        (chat("m", generation=pb.GenerationOptions(temperature=3)), "generation.temperature"),
        (chat("m", generation=pb.GenerationOptions(top_p=0)), "generation.top_p"),
        (chat("m", generation=pb.GenerationOptions(max_output_tokens=0)), "generation.max_output_tokens"),
        (chat("m", generation=pb.GenerationOptions(stop_sequences=[""])), "generation.stop_sequences[0]"),
        (
            chat(
                "m",
                generation=pb.GenerationOptions(
                    response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA)
                ),
            ),
            "generation.response_format.json_schema.schema",
        ),
        (chat("m", tools=[pb.Tool(name="bad name")]), "tools[0].name"),
        (chat("m", tool_choice=pb.ToolChoice(function_name="missing")), "tool_choice.function_name"),
        (
            pb.ChatRequest(
                model="m",
                messages=[
                    pb.Message(
                        role=pb.ROLE_USER,
                        content=[pb.ContentPart(image=pb.ImagePart(data=b"x", mime_type="text/plain"))],
                    )
                ],
            ),
            "messages[0].content[0].image.mime_type",
        ),
        (
            pb.ChatRequest(
                model="m",
                messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(image=pb.ImagePart(url="ftp://x"))])],
            ),
            "messages[0].content[0].image.url",
        ),
        (chat("m", metadata={str(i): "v" for i in range(17)}), "metadata"),
        (chat("m", cache=pb.CacheOptions(ttl_seconds=0)), "cache.ttl_seconds"),
        (chat("m", routing=pb.RoutingOptions(provider="nope")), "routing.provider"),
    ],
)
async def test_invalid_chat_fields(gateway: Gateway, request_: pb.ChatRequest, field: str) -> None:
    error = await expect_error(gateway.stub.Chat(request_))
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert error.bad_request is not None
    assert field in [v.field for v in error.bad_request.field_violations]


async def test_all_violations_reported_at_once(gateway: Gateway) -> None:
    error = await expect_error(gateway.stub.Chat(pb.ChatRequest(generation=pb.GenerationOptions(temperature=-1))))
    assert error.bad_request is not None
    assert {v.field for v in error.bad_request.field_violations} == {"model", "messages", "generation.temperature"}


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.EmbedRequest(model="m"), "inputs"),
        (pb.EmbedRequest(model="m", inputs=["ok", ""]), "inputs[1]"),
        (pb.EmbedRequest(model="m", inputs=["x"] * 2049), "inputs"),
        (pb.EmbedRequest(model="m", inputs=["x"], dimensions=0), "dimensions"),
    ],
)
async def test_invalid_embed_fields(gateway: Gateway, request_: pb.EmbedRequest, field: str) -> None:
    error = await expect_error(gateway.stub.Embed(request_))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.bad_request is not None
    assert field in [v.field for v in error.bad_request.field_violations]


async def test_unknown_model_without_passthrough_is_not_found(make_gateway: object) -> None:
    gateway = await make_gateway({})  # type: ignore[operator]
    error = await expect_error(gateway.stub.Chat(chat("no-such-model")))
    assert (error.code, error.info.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert error.info.metadata["model"] == "no-such-model"


async def test_catalog_model_of_unconfigured_provider(make_gateway: object) -> None:
    gateway = await make_gateway({})  # type: ignore[operator]
    error = await expect_error(gateway.stub.Chat(chat("gpt-4o-mini")))
    assert (error.code, error.info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_NOT_CONFIGURED")
    assert "OPENAI_API_KEY" in error.message and error.info.metadata["provider"] == "openai"


async def test_capability_check_uses_catalog(gateway: Gateway) -> None:
    image = pb.ContentPart(image=pb.ImagePart(url="https://example.com/a.png"))
    request = pb.ChatRequest(model="llama3.2", messages=[pb.Message(role=pb.ROLE_USER, content=[image])])
    error = await expect_error(gateway.stub.Chat(request))
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CAPABILITY_NOT_SUPPORTED")
    assert "gpt-4o-mini" in error.message  # names models that can
    error = await expect_error(gateway.stub.Chat(chat("text-embedding-3-small")))
    assert error.info.reason == "CAPABILITY_NOT_SUPPORTED"


_texts = st.text(max_size=40)
_parts = st.builds(
    pb.ContentPart,
    text=_texts,
) | st.builds(
    lambda url, data, mime: pb.ContentPart(
        image=pb.ImagePart(url=url) if url is not None else pb.ImagePart(data=data, mime_type=mime)
    ),
    st.one_of(st.none(), st.text(max_size=30)),
    st.binary(max_size=16),
    st.sampled_from(["", "image/png", "text/plain"]),
)
_messages = st.builds(
    pb.Message,
    role=st.integers(min_value=-1, max_value=6),
    content=st.lists(_parts, max_size=3),
    tool_call_id=_texts,
    name=_texts,
)
_generation = st.builds(
    pb.GenerationOptions,
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    top_p=st.floats(min_value=-1, max_value=2),
    max_output_tokens=st.integers(min_value=-5, max_value=2_000_000),
    stop_sequences=st.lists(_texts, max_size=3),
)
_requests = st.builds(
    pb.ChatRequest,
    model=st.sampled_from(["", "m", "gpt-4o-mini", "ollama/llama3.2", "llava", "nope/x", "x" * 300]),
    messages=st.lists(_messages, max_size=4),
    generation=_generation,
    end_user_id=st.text(max_size=300),
    tools=st.lists(st.builds(pb.Tool, name=_texts), max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=_requests)
async def test_arbitrary_requests_never_crash(gateway: Gateway, request: pb.ChatRequest) -> None:
    try:
        await gateway.stub.Chat(request, timeout=10)
    except grpc.aio.AioRpcError as error:
        decoded = rich_error(error)
        assert decoded.code != grpc.StatusCode.INTERNAL, decoded.message
        assert decoded.code != grpc.StatusCode.UNKNOWN
