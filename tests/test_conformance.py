"""Conformance matrix: every provider (OpenAI, OpenAI-compatible, Anthropic, Groq, Ollama) × every
feature, driven through the gateway's gRPC API, over each official SDK and real HTTP, against a
loopback emulator of that provider's wire protocol.

Test ids read `test_<cell>[<provider>]`; `pytest -v tests/test_conformance.py` prints the matrix.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import message as pb_message

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .conftest import Gateway, GatewayFactory, chat, chat_stream, collect, expect_error, user
from .emulators.anthropic_server import AnthropicEmulator
from .emulators.base import Recorded
from .emulators.groq_server import GroqEmulator
from .emulators.ollama_server import OllamaEmulator
from .emulators.openai_server import OpenAIEmulator

PROVIDERS = ["openai", "compat", "anthropic", "groq", "ollama"]
EMBEDDERS = {"openai", "compat", "ollama"}


@dataclass
class Stack:
    """A gateway with all five providers on their emulators."""

    gateway: Gateway
    upstreams: dict[str, Any]

    def last(self, provider: str) -> Recorded:
        return self.upstreams[provider].requests[-1]


@pytest.fixture
async def stack(make_gateway: GatewayFactory) -> AsyncIterator[Stack]:
    upstreams: dict[str, Any] = {
        "openai": OpenAIEmulator(),
        "compat": OpenAIEmulator(models=("local-model",)),
        "anthropic": AnthropicEmulator(),
        "groq": GroqEmulator(),
        "ollama": OllamaEmulator(),
    }
    for emulator in upstreams.values():
        await emulator.start()
    gateway = await make_gateway(
        {
            "OPENAI_API_KEY": "sk-openai-test",
            "OPENAI_BASE_URL": upstreams["openai"].base_url,
            "ANTHROPIC_API_KEY": "sk-ant-test",
            "ANTHROPIC_BASE_URL": upstreams["anthropic"].base_url,
            "GROQ_API_KEY": "gsk_test",
            "GROQ_BASE_URL": upstreams["groq"].base_url,
            "OLLAMA_HOST": upstreams["ollama"].host,
        },
        providers=[{"name": "compat", "kind": "openai", "base_url": upstreams["compat"].base_url}],
    )
    yield Stack(gateway, upstreams)
    for emulator in upstreams.values():
        await emulator.stop()


def _shape(message: pb_message.Message) -> set[str]:
    """Names of the set fields, recursively (what a client sees, without values)."""
    names: set[str] = set()
    for field, value in message.ListFields():
        names.add(field.name)
        if field.message_type is not None:
            items = [value] if isinstance(value, pb_message.Message) else list(value)
            for item in items:
                if isinstance(item, pb_message.Message):
                    names |= {f"{field.name}.{n}" for n in _shape(item)}
    return names


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_chat(stack: Stack, provider: str) -> None:
    reply = await stack.gateway.stub.Chat(chat(f"{provider}/default", "Hi"))
    assert reply.message.content[0].text == "echo: Hi"
    assert reply.finish_reason == pb.FINISH_REASON_STOP and reply.provider == provider
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens > 0
    assert not reply.usage.estimated


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_stream(stack: Stack, provider: str) -> None:
    events = await collect(stack.gateway.stub.ChatStream(chat_stream(f"{provider}/default", "Hi")))
    assert "".join(e.delta.text for e in events[:-1]) == "echo: Hi"
    final = events[-1].final
    assert final.finish_reason == pb.FINISH_REASON_STOP
    assert final.usage.output_tokens > 0 and not final.usage.estimated


def _weather_tool() -> pb.Tool:
    tool = pb.Tool(name="get_weather", description="Weather by city")
    tool.parameters.update({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    return tool


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_tools(stack: Stack, provider: str) -> None:
    reply = await stack.gateway.stub.Chat(chat(f"{provider}/tools", "Weather?", tools=[_weather_tool()]))
    assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    (call,) = reply.message.tool_calls
    assert call.id and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    # the result goes back in the provider's form
    follow = pb.ChatRequest(
        model=f"{provider}/default",
        messages=[
            user("Weather?"),
            pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id=call.id, content=[pb.ContentPart(text="21C")]),
        ],
        tools=[_weather_tool()],
    )
    await stack.gateway.stub.Chat(follow)
    sent = json.dumps(stack.last(provider).body)
    assert "21C" in sent and "get_weather" in sent


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_streamed_tools(stack: Stack, provider: str) -> None:
    request = chat_stream(f"{provider}/tools", "Weather?", tools=[_weather_tool()])
    events = await collect(stack.gateway.stub.ChatStream(request))
    final = events[-1].final
    assert final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert [(c.name, json.loads(c.arguments)) for c in final.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert all(c.id for c in final.tool_calls)


_IMAGE_PATHS = {
    "openai": lambda body: body["messages"][0]["content"][1]["image_url"]["url"],
    "compat": lambda body: body["messages"][0]["content"][1]["image_url"]["url"],
    "groq": lambda body: body["messages"][0]["content"][1]["image_url"]["url"],
    "anthropic": lambda body: body["messages"][0]["content"][1]["source"]["data"],
    "ollama": lambda body: body["messages"][0]["images"][0],
}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_image_input(stack: Stack, provider: str) -> None:
    image = pb.ContentPart(image=pb.ImagePart(data=b"\x89PNG", mime_type="image/png"))
    request = pb.ChatRequest(
        model=f"{provider}/default",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text="What is it?"), image])],
    )
    await stack.gateway.stub.Chat(request)
    assert _IMAGE_PATHS[provider](stack.last(provider).body).endswith("iVBORw==")


async def test_image_input_refused_for_text_only_model(stack: Stack) -> None:
    image = pb.ContentPart(image=pb.ImagePart(data=b"\x89PNG", mime_type="image/png"))
    request = pb.ChatRequest(model="llama-3.1-8b-instant", messages=[pb.Message(role=pb.ROLE_USER, content=[image])])
    error = await expect_error(stack.gateway.stub.Chat(request))
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CAPABILITY_NOT_SUPPORTED")
    assert error.info.metadata["provider"] == "groq"  # found from outside: the provider was missing


_JSON_MODE = {
    "openai": lambda body: body["response_format"] == {"type": "json_object"},
    "compat": lambda body: body["response_format"] == {"type": "json_object"},
    "groq": lambda body: body["response_format"] == {"type": "json_object"},
    "anthropic": lambda body: body["output_config"]["format"]["type"] == "json_schema",
    "ollama": lambda body: body["format"] == "json",
}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_json_mode(stack: Stack, provider: str) -> None:
    generation = pb.GenerationOptions(response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT))
    await stack.gateway.stub.Chat(chat(f"{provider}/default", generation=generation))
    assert _JSON_MODE[provider](stack.last(provider).body)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_embeddings_or_error(stack: Stack, provider: str) -> None:
    request = pb.EmbedRequest(model=f"{provider}/embedder", inputs=["a", "bb"])
    if provider in EMBEDDERS:
        reply = await stack.gateway.stub.Embed(request)
        assert [e.values[0] for e in reply.embeddings] == [1.0, 2.0] and reply.provider == provider
    else:
        error = await expect_error(stack.gateway.stub.Embed(request))
        assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CAPABILITY_NOT_SUPPORTED")
        assert "text-embedding-3-small" in error.message and "nomic-embed-text" in error.message
        assert error.info.metadata["provider"] == provider


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_list_and_get_models(stack: Stack, provider: str) -> None:
    listed = await stack.gateway.stub.ListModels(pb.ListModelsRequest(provider=provider, page_size=1000))
    live = {m.id for m in listed.models if m.source == pb.MODEL_SOURCE_PROVIDER}
    catalog_or_live = {m.provider_model for m in listed.models}
    upstream = set(stack.upstreams[provider].models)
    if provider == "ollama":  # `llama3.2:latest` is the catalog's `llama3.2` (listed once, as the catalog entry)
        upstream = {m.removesuffix(":latest") for m in upstream}
        catalog_or_live = {m.removesuffix(":latest") for m in catalog_or_live}
    assert upstream <= catalog_or_live, (provider, catalog_or_live)
    assert all(m.provider == provider for m in listed.models)
    name = f"models/{next(iter(live))}" if live else f"models/{listed.models[0].id}"
    got = await stack.gateway.stub.GetModel(pb.GetModelRequest(name=name))
    assert got.model.provider == provider


_COUNT = {
    "openai": ("openai/gpt-4o-mini", pb.TOKEN_COUNT_METHOD_TOKENIZER),
    "compat": ("compat/local-model", pb.TOKEN_COUNT_METHOD_ESTIMATE),
    "anthropic": ("anthropic/claude-emulated-1", pb.TOKEN_COUNT_METHOD_PROVIDER),
    "groq": ("groq/openai/gpt-oss-20b", pb.TOKEN_COUNT_METHOD_TOKENIZER),
    "ollama": ("ollama/llama3.2", pb.TOKEN_COUNT_METHOD_ESTIMATE),
}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_count_tokens(stack: Stack, provider: str) -> None:
    model, method = _COUNT[provider]
    text = "Hello there, how are you today?"
    reply = await stack.gateway.stub.CountTokens(pb.CountTokensRequest(model=model, messages=[user(text)]))
    assert reply.method == method and reply.provider == provider
    assert reply.estimated == (method == pb.TOKEN_COUNT_METHOD_ESTIMATE)
    if method == pb.TOKEN_COUNT_METHOD_PROVIDER:
        assert reply.input_tokens == 3 + len(text) // 4  # the emulator's documented rule
    elif method == pb.TOKEN_COUNT_METHOD_TOKENIZER:
        assert reply.tokenizer == "o200k_base"
        assert reply.input_tokens == 3 + 3 + 1 + 8  # reply priming + message framing + "user" + 8 text tokens
    else:
        assert reply.input_tokens == (len(text) + 3) // 4 + 4


_ERRORS = [
    ("status-400", grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED"),
    ("status-401", grpc.StatusCode.INTERNAL, "PROVIDER_AUTH_FAILED"),
    ("status-403", grpc.StatusCode.INTERNAL, "PROVIDER_AUTH_FAILED"),
    ("missing-model", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
    ("status-429", grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED"),
    ("status-500", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    ("status-503", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    ("status-529", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
    ("context-length", grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED"),
    ("malformed", grpc.StatusCode.UNAVAILABLE, "PROVIDER_BAD_RESPONSE"),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("scenario", "code", "reason"), _ERRORS, ids=[e[0] for e in _ERRORS])
async def test_error_class(stack: Stack, provider: str, scenario: str, code: grpc.StatusCode, reason: str) -> None:
    if provider == "ollama" and scenario in ("context-length", "malformed"):
        pytest.skip("the Ollama API has no distinct context-length error, and its emulator no malformed-body mode")
    error = await expect_error(stack.gateway.stub.Chat(chat(f"{provider}/{scenario}")))
    assert (error.code, error.info.reason) == (code, reason)
    assert error.info.metadata["provider"] == provider
    if scenario == "status-429":
        assert error.retry is not None or provider == "ollama"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_stream_error_after_content(stack: Stack, provider: str) -> None:
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in stack.gateway.stub.ChatStream(chat_stream(f"{provider}/stream-error", "Hello")):
            received.append(event)
    assert received and caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_deadline(stack: Stack, provider: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.gateway.stub.Chat(chat(f"{provider}/hang"), timeout=0.4)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_switching_provider_changes_only_content_model_provider(stack: Stack) -> None:
    shapes = {}
    for provider in PROVIDERS:
        reply = await stack.gateway.stub.Chat(chat(f"{provider}/default", "Same request"))
        assert reply.finish_reason == pb.FINISH_REASON_STOP and reply.message.role == pb.ROLE_ASSISTANT
        shape = _shape(reply)
        # usage detail fields are set only when non-zero (e.g. cache counters of Anthropic)
        shapes[provider] = {n for n in shape if not n.startswith("usage.cache")}
    first = shapes["openai"]
    for provider, shape in shapes.items():
        assert shape ^ first <= {"provider_response_id"}, (provider, shape ^ first)
