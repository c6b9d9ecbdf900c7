"""Chat through the gateway to an OpenAI-compatible upstream, over the official `openai` SDK and
real HTTP to the loopback emulator: success paths, translation, and every mapped error."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .conftest import OPENAI_TEST_KEY, Gateway, chat, chat_stream, collect, expect_error, user
from .emulators.openai_server import OpenAIEmulator

ISSUE_JSON = '{"model":"m","messages":[{"role":"ROLE_USER","content":[{"text":"Hi"}]}]}'


def _openai_env(upstream: OpenAIEmulator) -> dict[str, str]:
    return {"OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": upstream.base_url}


async def test_chat_returns_answer_usage_model_provider(gateway: Gateway, openai_upstream: OpenAIEmulator) -> None:
    request = json_format.Parse(ISSUE_JSON, pb.ChatRequest())
    response = await gateway.stub.Chat(request)
    assert response.message.role == pb.ROLE_ASSISTANT
    assert response.message.content[0].text == "echo: Hi"
    assert response.finish_reason == pb.FINISH_REASON_STOP
    assert response.provider_finish_reason == "stop"
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (11, 7, 18)
    assert response.usage.cached_input_tokens == 2
    assert not response.usage.estimated
    assert response.model == "m" and response.provider == "openai"
    assert response.provider_response_id == "chatcmpl-emulated"
    assert [a.outcome for a in response.attempts] == [pb.ATTEMPT_OUTCOME_SUCCESS]
    assert response.attempts[0].latency_ms > 0
    assert not response.cost.priced  # "m" is not in the catalog
    sent = openai_upstream.calls("/chat/completions")[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["Authorization"] == f"Bearer {OPENAI_TEST_KEY}"
    assert sent.body == {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


async def test_catalog_model_gets_cost(gateway: Gateway) -> None:
    response = await gateway.stub.Chat(chat("gpt-4o-mini"))
    assert response.cost.priced
    # 9 uncached input tokens at $0.15/M + 2 cached at $0.075/M + 7 output at $0.60/M (catalog prices)
    assert response.cost.input_usd == pytest.approx((9 * 0.15 + 2 * 0.075) / 1e6)
    assert response.cost.output_usd == pytest.approx(7 * 0.60 / 1e6)
    assert response.cost.total_usd == pytest.approx(response.cost.input_usd + response.cost.output_usd)


async def test_stream_sends_deltas_then_final_with_usage(make_gateway: object, openai_upstream: OpenAIEmulator) -> None:
    # Coalescing off: this checks that every upstream chunk becomes a delta (tests/test_coalescing.py
    # covers the default, which merges deltas that wait).
    gateway = await make_gateway(_openai_env(openai_upstream), stream_coalescing=False)  # type: ignore[operator]
    request = json_format.Parse(ISSUE_JSON, pb.ChatStreamRequest())
    messages = await collect(gateway.stub.ChatStream(request))
    deltas = [m for m in messages if m.WhichOneof("event") == "delta"]
    assert "".join(m.delta.text for m in deltas) == "echo: Hi"
    assert len(deltas) >= 3
    final = messages[-1]
    assert final.WhichOneof("event") == "final"
    assert sum(1 for m in messages if m.WhichOneof("event") == "final") == 1
    assert final.final.finish_reason == pb.FINISH_REASON_STOP
    assert final.final.usage.total_tokens == 18 and not final.final.usage.estimated
    assert len({m.id for m in messages}) == 1 and final.provider == "openai"
    body = openai_upstream.calls("/chat/completions")[-1].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_stream_without_usage_is_estimated(gateway: Gateway) -> None:
    messages = await collect(gateway.stub.ChatStream(chat_stream("no-usage", "Hello there")))
    final = messages[-1].final
    assert final.usage.estimated
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


async def test_generation_options_are_translated(gateway: Gateway, openai_upstream: OpenAIEmulator) -> None:
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": {"a": {"type": "string"}}})
    request = chat(
        "m",
        generation=pb.GenerationOptions(
            temperature=0.2,
            top_p=0.9,
            top_k=5,
            max_output_tokens=64,
            stop_sequences=["END"],
            seed=7,
            presence_penalty=0.1,
            frequency_penalty=0.2,
            response_format=pb.ResponseFormat(
                type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                json_schema=pb.JsonSchema(name="answer", schema=schema, strict=True),
            ),
        ),
        end_user_id="user-42",
    )
    response = await gateway.stub.Chat(request)
    body = openai_upstream.calls("/chat/completions")[-1].body
    assert body["temperature"] == 0.2 and body["top_p"] == 0.9 and body["max_tokens"] == 64
    assert body["stop"] == ["END"] and body["seed"] == 7 and body["user"] == "user-42"
    assert body["presence_penalty"] == 0.1 and body["frequency_penalty"] == 0.2
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
            "strict": True,
        },
    }
    assert "top_k" not in body
    assert [(w.code, w.field) for w in response.warnings] == [("OPTION_DROPPED", "generation.top_k")]


async def test_unset_options_are_not_sent(gateway: Gateway, openai_upstream: OpenAIEmulator) -> None:
    await gateway.stub.Chat(chat("m", generation=pb.GenerationOptions(temperature=0.0)))
    body = openai_upstream.calls("/chat/completions")[-1].body
    assert body["temperature"] == 0.0  # explicit zero is sent (optional scalar), nothing else is
    assert set(body) == {"model", "messages", "temperature"}


async def test_tool_calls_round_trip(gateway: Gateway, openai_upstream: OpenAIEmulator) -> None:
    params = struct_pb2.Struct()
    params.update({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    tools = [pb.Tool(name="get_weather", description="Weather by city", parameters=params)]
    response = await gateway.stub.Chat(
        chat("tools", tools=tools, tool_choice=pb.ToolChoice(function_name="get_weather"))
    )
    assert response.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    call = response.message.tool_calls[0]
    assert (call.id, call.name, json.loads(call.arguments)) == ("call_emul_1", "get_weather", {"city": "Paris"})
    body = openai_upstream.calls("/chat/completions")[-1].body
    assert body["tools"][0]["function"]["name"] == "get_weather"
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}

    follow_up = pb.ChatRequest(
        model="m",
        messages=[
            user("Weather in Paris?"),
            pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id=call.id, content=[pb.ContentPart(text='{"temp_c": 21}')]),
        ],
        tools=tools,
    )
    await gateway.stub.Chat(follow_up)
    sent = openai_upstream.calls("/chat/completions")[-1].body["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_emul_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    }
    assert sent[2] == {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call_emul_1"}


async def test_streamed_tool_call_fragments_are_assembled(
    make_gateway: object, openai_upstream: OpenAIEmulator
) -> None:
    gateway = await make_gateway(_openai_env(openai_upstream), stream_coalescing=False)  # type: ignore[operator]
    tools = [pb.Tool(name="get_weather")]
    messages = await collect(gateway.stub.ChatStream(chat_stream("tools", tools=tools)))
    fragments = [f for m in messages if m.WhichOneof("event") == "delta" for f in m.delta.tool_calls]
    assert len(fragments) == 4 and fragments[0].id == "call_emul_1" and fragments[0].name == "get_weather"
    final = messages[-1].final
    assert final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert [(c.id, c.name, json.loads(c.arguments)) for c in final.tool_calls] == [
        ("call_emul_1", "get_weather", {"city": "Paris"})
    ]


async def test_image_bytes_are_sent_as_data_url(gateway: Gateway, openai_upstream: OpenAIEmulator) -> None:
    message = pb.Message(
        role=pb.ROLE_USER,
        content=[
            pb.ContentPart(text="What is this?"),
            pb.ContentPart(image=pb.ImagePart(data=b"\x89PNG", mime_type="image/png", detail=pb.IMAGE_DETAIL_LOW)),
        ],
    )
    await gateway.stub.Chat(pb.ChatRequest(model="gpt-4o-mini", messages=[message]))
    content = openai_upstream.calls("/chat/completions")[-1].body["messages"][0]["content"]
    assert content == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw==", "detail": "low"}},
    ]


@pytest.mark.parametrize(
    ("model", "code", "reason", "upstream_status"),
    [
        ("status-500", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE", "500"),
        ("status-503", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE", "503"),
        ("status-502", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE", "502"),
        ("status-408", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE", "408"),
        ("status-409", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE", "409"),
        ("status-429", grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED", "429"),
        ("quota", grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_QUOTA_EXHAUSTED", "429"),
        ("status-401", grpc.StatusCode.INTERNAL, "PROVIDER_AUTH_FAILED", "401"),
        ("status-403", grpc.StatusCode.INTERNAL, "PROVIDER_AUTH_FAILED", "403"),
        ("missing-model", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "404"),
        ("status-400", grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED", "400"),
        ("status-422", grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED", "422"),
        ("context-length", grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED", "400"),
        ("content-filter", grpc.StatusCode.INVALID_ARGUMENT, "CONTENT_FILTERED", "400"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_upstream_errors_map_to_status(
    gateway: Gateway,
    openai_upstream: OpenAIEmulator,
    model: str,
    code: grpc.StatusCode,
    reason: str,
    upstream_status: str,
    streaming: bool,
) -> None:
    call = collect(gateway.stub.ChatStream(chat_stream(model))) if streaming else gateway.stub.Chat(chat(model))
    error = await expect_error(call)
    assert (error.code, error.info.reason) == (code, reason)
    assert error.info.metadata["provider"] == "openai"
    assert error.info.metadata["model"] == model
    assert error.info.metadata["upstream_status"] == upstream_status
    assert error.info.metadata["request_id"] == error.trailers["x-request-id"]
    assert len(openai_upstream.calls("/chat/completions")) == 1, "SDK retries must be off"
    assert OPENAI_TEST_KEY not in error.message and "sk-abc" not in error.message
    if model == "status-429":
        assert error.retry is not None and error.retry.retry_delay.seconds == 1
        assert error.retry.retry_delay.nanos == 500_000_000
    else:
        assert error.retry is None


async def test_malformed_body_is_bad_response(gateway: Gateway) -> None:
    error = await expect_error(gateway.stub.Chat(chat("malformed")))
    assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_BAD_RESPONSE")


async def test_unreachable_upstream_is_unavailable(make_gateway: object) -> None:
    gateway = await make_gateway({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})  # type: ignore[operator]
    error = await expect_error(gateway.stub.Chat(chat("m")))
    assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert error.info.metadata["failure"] == "connection"


@pytest.mark.parametrize(
    ("model", "reason", "chunks"),
    [
        ("stream-error", "PROVIDER_UNAVAILABLE", "1"),
        ("drop-stream", "PROVIDER_UNAVAILABLE", "1"),
        ("truncated", "PROVIDER_BAD_RESPONSE", "1"),
    ],
)
async def test_stream_failure_after_content_is_unavailable_never_silent(
    gateway: Gateway, model: str, reason: str, chunks: str
) -> None:
    received: list[pb.ChatStreamResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in gateway.stub.ChatStream(chat_stream(model, "Hello world")):
            received.append(message)
    assert received and all(m.WhichOneof("event") == "delta" for m in received)
    from .conftest import rich_error

    error = rich_error(caught.value)
    assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, reason)
    assert error.info.metadata["chunks_sent"] == chunks
    assert error.info.metadata["provider"] == "openai"


async def test_deadline_bounds_upstream_call_and_closes_it(gateway: Gateway, openai_upstream: OpenAIEmulator) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Chat(chat("hang"), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert loop.time() - started < 2.0
    for _ in range(50):
        if openai_upstream.disconnects:
            break
        await asyncio.sleep(0.05)
    assert openai_upstream.disconnects == ["chat"]


async def test_server_default_deadline_applies_without_client_deadline(
    make_gateway: object, openai_upstream: OpenAIEmulator
) -> None:
    gateway = await make_gateway({"OPENAI_BASE_URL": openai_upstream.base_url}, default_deadline_s=0.3)  # type: ignore[operator]
    error = await expect_error(gateway.stub.Chat(chat("hang")))
    assert (error.code, error.info.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")
    assert error.info.metadata["provider"] == "openai"


async def test_stalled_stream_ends_at_deadline(gateway: Gateway, openai_upstream: OpenAIEmulator) -> None:
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in gateway.stub.ChatStream(chat_stream("stall-stream"), timeout=0.6):
            received.append(message)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(received) == 1
    for _ in range(50):
        if openai_upstream.disconnects:
            break
        await asyncio.sleep(0.05)
    assert openai_upstream.disconnects == ["stream"]


async def test_client_cancel_closes_upstream_request(gateway: Gateway, openai_upstream: OpenAIEmulator) -> None:
    call = gateway.stub.ChatStream(chat_stream("hang"))
    reader = asyncio.ensure_future(collect(call))
    await asyncio.wait_for(openai_upstream.hang_started.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    for _ in range(100):
        if openai_upstream.disconnects:
            break
        await asyncio.sleep(0.05)
    assert openai_upstream.disconnects == ["chat"]


async def test_unary_client_cancel_closes_upstream_request(gateway: Gateway, openai_upstream: OpenAIEmulator) -> None:
    call = gateway.stub.Chat(chat("hang"))
    await asyncio.wait_for(openai_upstream.hang_started.wait(), 5)
    call.cancel()
    for _ in range(100):
        if openai_upstream.disconnects:
            break
        await asyncio.sleep(0.05)
    assert openai_upstream.disconnects == ["chat"]


@pytest.mark.parametrize("http_client", ["aiohttp", "httpx"])
async def test_both_sdk_transports_answer_alike(
    make_gateway: object, openai_upstream: OpenAIEmulator, http_client: str
) -> None:
    """`providers[].http_client` picks the SDK's transport; answers and error classes match."""

    def provider(base_url: str) -> dict[str, object]:
        settings = {"name": "openai", "kind": "openai", "base_url": base_url, "api_key": OPENAI_TEST_KEY}
        return {**settings, "http_client": http_client}

    gateway = await make_gateway({}, providers=[provider(openai_upstream.base_url)])  # type: ignore[operator]
    reply = await gateway.stub.Chat(chat("m", "Hello"))
    assert reply.message.content[0].text == "echo: Hello" and reply.usage.total_tokens == 18
    events = await collect(gateway.stub.ChatStream(chat_stream("m", "Hello")))
    assert "".join(e.delta.text for e in events[:-1]) == "echo: Hello"
    assert events[-1].final.finish_reason == pb.FINISH_REASON_STOP
    error = await expect_error(gateway.stub.Chat(chat("status-503")))
    assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert error.info.metadata["upstream_status"] == "503"
    error = await expect_error(collect(gateway.stub.ChatStream(chat_stream("drop"))))
    assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert error.info.metadata["failure"] == "connection", error.info.metadata
    unreachable = await make_gateway({}, providers=[provider("http://127.0.0.1:9/v1")])  # type: ignore[operator]
    error = await expect_error(unreachable.stub.Chat(chat("m")))
    assert error.info.metadata["failure"] == "connection"
