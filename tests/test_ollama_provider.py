"""Chat through the gateway to Ollama, over the official `ollama` SDK and real HTTP to the
loopback emulator of its native API (JSON and NDJSON streams)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.protobuf import struct_pb2

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .conftest import Gateway, chat, chat_stream, collect, expect_error, rich_error, user
from .emulators.ollama_server import OllamaEmulator


async def test_catalog_model_routes_to_ollama(gateway: Gateway, ollama_upstream: OllamaEmulator) -> None:
    response = await gateway.stub.Chat(chat("llama3.2", "Hello"))
    assert response.provider == "ollama" and response.model == "llama3.2"
    assert response.message.content[0].text == "echo: Hello"
    assert response.finish_reason == pb.FINISH_REASON_STOP
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (13, 5, 18)
    assert response.cost.priced and response.cost.total_usd == 0.0  # local model: no per-token price
    sent = ollama_upstream.requests[-1]
    assert sent.path == "/api/chat" and sent.body["stream"] is False
    assert sent.body["messages"] == [{"role": "user", "content": "Hello"}]


async def test_explicit_provider_prefix(gateway: Gateway, ollama_upstream: OllamaEmulator) -> None:
    response = await gateway.stub.Chat(chat("ollama/tinyllama"))
    assert response.provider == "ollama" and response.model == "tinyllama"
    assert ollama_upstream.requests[-1].body["model"] == "tinyllama"


async def test_stream_ndjson_deltas_and_final(gateway: Gateway) -> None:
    messages = await collect(gateway.stub.ChatStream(chat_stream("ollama/llama3.2", "Hello")))
    assert "".join(m.delta.text for m in messages[:-1]) == "echo: Hello"
    final = messages[-1]
    assert final.WhichOneof("event") == "final"
    assert final.final.finish_reason == pb.FINISH_REASON_STOP and final.final.usage.total_tokens == 18


async def test_length_finish_reason(gateway: Gateway) -> None:
    response = await gateway.stub.Chat(chat("ollama/length"))
    assert response.finish_reason == pb.FINISH_REASON_LENGTH and response.provider_finish_reason == "length"


async def test_options_translation_and_dropped_options(gateway: Gateway, ollama_upstream: OllamaEmulator) -> None:
    response = await gateway.stub.Chat(
        chat(
            "ollama/llama3.2",
            generation=pb.GenerationOptions(
                temperature=0.1,
                top_k=20,
                max_output_tokens=5,
                seed=3,
                stop_sequences=["\n"],
                response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
            ),
            tools=[pb.Tool(name="lookup")],
            tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
        )
    )
    body = ollama_upstream.requests[-1].body
    assert body["options"] == {"temperature": 0.1, "top_k": 20, "num_predict": 5, "seed": 3, "stop": ["\n"]}
    assert body["format"] == "json"
    assert body["tools"][0]["function"]["name"] == "lookup"
    assert [(w.code, w.field) for w in response.warnings] == [("OPTION_DROPPED", "tool_choice")]


async def test_tool_calls_and_results(gateway: Gateway, ollama_upstream: OllamaEmulator) -> None:
    params = struct_pb2.Struct()
    params.update({"type": "object", "properties": {"city": {"type": "string"}}})
    tools = [pb.Tool(name="get_weather", parameters=params)]
    response = await gateway.stub.Chat(chat("ollama/tools", tools=tools))
    assert response.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    call = response.message.tool_calls[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")  # Ollama gives no id; the gateway makes one

    await gateway.stub.Chat(
        pb.ChatRequest(
            model="ollama/llama3.2",
            messages=[
                user("Weather?"),
                pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
                pb.Message(role=pb.ROLE_TOOL, tool_call_id=call.id, content=[pb.ContentPart(text="21C")]),
            ],
        )
    )
    sent = ollama_upstream.requests[-1].body["messages"]
    assert sent[1]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert sent[2] == {"role": "tool", "content": "21C", "tool_name": "get_weather"}

    messages = await collect(gateway.stub.ChatStream(chat_stream("ollama/tools", tools=tools)))
    final = messages[-1].final
    assert final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert [(c.name, json.loads(c.arguments)) for c in final.tool_calls] == [("get_weather", {"city": "Paris"})]


async def test_image_bytes_become_base64_images(gateway: Gateway, ollama_upstream: OllamaEmulator) -> None:
    message = pb.Message(
        role=pb.ROLE_USER,
        content=[
            pb.ContentPart(text="describe"),
            pb.ContentPart(image=pb.ImagePart(data=b"abc", mime_type="image/jpeg")),
        ],
    )
    await gateway.stub.Chat(pb.ChatRequest(model="llava", messages=[message]))
    assert ollama_upstream.requests[-1].body["messages"][0]["images"] == ["YWJj"]


async def test_image_url_is_rejected_for_ollama(gateway: Gateway, ollama_upstream: OllamaEmulator) -> None:
    message = pb.Message(
        role=pb.ROLE_USER,
        content=[
            pb.ContentPart(text="describe"),
            pb.ContentPart(image=pb.ImagePart(url="https://example.com/cat.png")),
        ],
    )
    error = await expect_error(gateway.stub.Chat(pb.ChatRequest(model="llava", messages=[message])))
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CAPABILITY_NOT_SUPPORTED")
    assert ollama_upstream.requests == []


@pytest.mark.parametrize(
    ("model", "code", "reason"),
    [
        ("status-500", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("status-503", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("status-429", grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED"),
        ("status-400", grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED"),
        ("missing-model", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_upstream_errors_map_to_status(
    gateway: Gateway, model: str, code: grpc.StatusCode, reason: str, streaming: bool
) -> None:
    name = f"ollama/{model}"
    call = collect(gateway.stub.ChatStream(chat_stream(name))) if streaming else gateway.stub.Chat(chat(name))
    error = await expect_error(call)
    assert (error.code, error.info.reason) == (code, reason)
    assert error.info.metadata["provider"] == "ollama" and error.info.metadata["model"] == model


@pytest.mark.parametrize(
    ("model", "reason"), [("stream-error", "PROVIDER_UNAVAILABLE"), ("truncated", "PROVIDER_BAD_RESPONSE")]
)
async def test_stream_failures_after_content(gateway: Gateway, model: str, reason: str) -> None:
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in gateway.stub.ChatStream(chat_stream(f"ollama/{model}", "Hello")):
            received.append(message)
    assert len(received) == 1
    error = rich_error(caught.value)
    assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, reason)
    assert error.info.metadata["chunks_sent"] == "1"


async def test_unreachable_ollama_is_unavailable(make_gateway: object) -> None:
    gateway = await make_gateway({"OLLAMA_HOST": "http://127.0.0.1:9"})  # type: ignore[operator]
    error = await expect_error(gateway.stub.Chat(chat("llama3.2")))
    assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")


async def test_deadline_and_disconnect(gateway: Gateway, ollama_upstream: OllamaEmulator) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.stub.Chat(chat("ollama/hang"), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(50):
        if ollama_upstream.disconnects:
            break
        await asyncio.sleep(0.05)
    assert ollama_upstream.disconnects == ["chat"]
