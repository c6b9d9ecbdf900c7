"""Provider-specific translation for Anthropic and Groq, and their error tables row by row
(the shared rows are in `providers/errors.py`; the conformance matrix covers the common cells)."""

from __future__ import annotations

import grpc
import pytest

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .conftest import Gateway, GatewayFactory, chat, chat_stream, collect, expect_error, user
from .emulators.anthropic_server import AnthropicEmulator
from .emulators.groq_server import GroqEmulator


@pytest.fixture
async def anthropic_upstream() -> AnthropicEmulator:
    emulator = AnthropicEmulator()
    await emulator.start()
    yield emulator  # type: ignore[misc]
    await emulator.stop()


@pytest.fixture
async def groq_upstream() -> GroqEmulator:
    emulator = GroqEmulator()
    await emulator.start()
    yield emulator  # type: ignore[misc]
    await emulator.stop()


@pytest.fixture
async def gw(
    make_gateway: GatewayFactory, anthropic_upstream: AnthropicEmulator, groq_upstream: GroqEmulator
) -> Gateway:
    return await make_gateway(
        {
            "ANTHROPIC_API_KEY": "sk-ant-secret-123456789",
            "ANTHROPIC_BASE_URL": anthropic_upstream.base_url,
            "GROQ_API_KEY": "gsk_secret123456789",
            "GROQ_BASE_URL": groq_upstream.base_url,
        }
    )


async def test_anthropic_request_translation(gw: Gateway, anthropic_upstream: AnthropicEmulator) -> None:
    request = pb.ChatRequest(
        model="claude-haiku-4-5",
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content=[pb.ContentPart(text="Be brief.")]),
            user("Hi"),
            pb.Message(role=pb.ROLE_SYSTEM, content=[pb.ContentPart(text="Use English.")]),
        ],
        generation=pb.GenerationOptions(temperature=0.5, top_k=3, stop_sequences=["END"]),
        end_user_id="u-1",
    )
    reply = await gw.stub.Chat(request)
    sent = anthropic_upstream.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["Authorization"] == "Bearer sk-ant-secret-123456789"
    body = sent.body
    assert body["model"] == "claude-haiku-4-5-20251001"  # catalog id → provider model
    assert body["system"] == "Be brief.\n\nUse English."
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert body["max_tokens"] == 64000  # the catalog's max output for the model
    assert body["stop_sequences"] == ["END"] and body["metadata"] == {"user_id": "u-1"}
    assert "temperature" not in body and "top_k" not in body
    assert {(w.code, w.field) for w in reply.warnings} == {
        ("OPTION_DROPPED", "generation.temperature"),
        ("OPTION_DROPPED", "generation.top_k"),
    }
    # Anthropic's input_tokens excludes cache reads/writes; the gateway's includes them
    assert (reply.usage.input_tokens, reply.usage.cached_input_tokens, reply.usage.cache_creation_input_tokens) == (
        16,
        2,
        3,
    )
    assert reply.cost.priced
    assert reply.cost.input_usd == pytest.approx((14 * 1.0 + 2 * 0.10) / 1e6)


async def test_anthropic_tool_results_merge_into_one_user_turn(
    gw: Gateway, anthropic_upstream: AnthropicEmulator
) -> None:
    calls = [pb.ToolCall(id="t1", name="a", arguments='{"x":1}'), pb.ToolCall(id="t2", name="b", arguments="")]
    request = pb.ChatRequest(
        model="anthropic/default",
        messages=[
            user("go"),
            pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentPart(text="calling")], tool_calls=calls),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="t1", content=[pb.ContentPart(text="r1")]),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="t2", content=[pb.ContentPart(text="r2")]),
        ],
        tools=[pb.Tool(name="a"), pb.Tool(name="b")],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
        generation=pb.GenerationOptions(parallel_tool_calls=False, max_output_tokens=10),
    )
    await gw.stub.Chat(request)
    body = anthropic_upstream.requests[-1].body
    assert body["messages"][1]["content"] == [
        {"type": "text", "text": "calling"},
        {"type": "tool_use", "id": "t1", "name": "a", "input": {"x": 1}},
        {"type": "tool_use", "id": "t2", "name": "b", "input": {}},
    ]
    assert body["messages"][2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "r1"},
            {"type": "tool_result", "tool_use_id": "t2", "content": "r2"},
        ],
    }
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["max_tokens"] == 10


@pytest.mark.parametrize(
    ("model", "finish", "raw"),
    [
        ("default", pb.FINISH_REASON_STOP, "end_turn"),
        ("stop-seq", pb.FINISH_REASON_STOP, "stop_sequence"),
        ("length", pb.FINISH_REASON_LENGTH, "max_tokens"),
        ("tools", pb.FINISH_REASON_TOOL_CALLS, "tool_use"),
        ("refusal", pb.FINISH_REASON_CONTENT_FILTER, "refusal"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_anthropic_stop_reasons(gw: Gateway, model: str, finish: int, raw: str, streaming: bool) -> None:
    if streaming:
        final = (await collect(gw.stub.ChatStream(chat_stream(f"anthropic/{model}"))))[-1].final
        assert (final.finish_reason, final.provider_finish_reason) == (finish, raw)
    else:
        reply = await gw.stub.Chat(chat(f"anthropic/{model}"))
        assert (reply.finish_reason, reply.provider_finish_reason) == (finish, raw)


@pytest.mark.parametrize(
    ("model", "code", "reason"),
    [
        ("status-400", grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED"),
        ("status-401", grpc.StatusCode.INTERNAL, "PROVIDER_AUTH_FAILED"),
        ("status-402", grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_QUOTA_EXHAUSTED"),
        ("status-403", grpc.StatusCode.INTERNAL, "PROVIDER_AUTH_FAILED"),
        ("missing-model", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        ("status-409", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("status-413", grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED"),
        ("status-429", grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED"),
        ("status-500", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("status-504", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("status-529", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("context-length", grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED"),
        ("malformed", grpc.StatusCode.UNAVAILABLE, "PROVIDER_BAD_RESPONSE"),
    ],
)
async def test_anthropic_error_table(
    gw: Gateway, anthropic_upstream: AnthropicEmulator, model: str, code: grpc.StatusCode, reason: str
) -> None:
    error = await expect_error(gw.stub.Chat(chat(f"anthropic/{model}")))
    assert (error.code, error.info.reason) == (code, reason)
    assert "sk-ant-secret" not in error.message
    if model == "status-429":
        assert error.retry is not None and error.retry.retry_delay.seconds == 2
    if model == "context-length":
        assert error.info.metadata["upstream_code"] == "context_length_exceeded"
    assert len(anthropic_upstream.calls("/v1/messages")) == 1  # SDK retries are off


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("stream-error", "PROVIDER_UNAVAILABLE"),
        ("drop-stream", "PROVIDER_UNAVAILABLE"),
        ("truncated", "PROVIDER_BAD_RESPONSE"),
    ],
)
async def test_anthropic_stream_failures(gw: Gateway, model: str, reason: str) -> None:
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in gw.stub.ChatStream(chat_stream(f"anthropic/{model}", "Hello")):
            received.append(event)
    from .conftest import rich_error

    error = rich_error(caught.value)
    assert received and (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, reason)
    assert error.info.metadata["chunks_sent"] == "1"


async def test_anthropic_json_schema_uses_output_config(gw: Gateway, anthropic_upstream: AnthropicEmulator) -> None:
    fmt = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=pb.JsonSchema(name="a"))
    fmt.json_schema.schema.update({"type": "object", "properties": {"answer": {"type": "string"}}})
    await gw.stub.Chat(chat("anthropic/default", generation=pb.GenerationOptions(response_format=fmt)))
    assert anthropic_upstream.requests[-1].body["output_config"] == {
        "format": {"type": "json_schema", "schema": {"type": "object", "properties": {"answer": {"type": "string"}}}}
    }


async def test_anthropic_models_are_paginated_and_merged(gw: Gateway, anthropic_upstream: AnthropicEmulator) -> None:
    listed = await gw.stub.ListModels(pb.ListModelsRequest(provider="anthropic", page_size=1000))
    ids = {m.id for m in listed.models}
    assert "anthropic/claude-emulated-1" in ids  # live only
    assert "claude-haiku-4-5" in ids  # catalog, matched to the live id claude-haiku-4-5-20251001
    assert "anthropic/claude-haiku-4-5-20251001" not in ids
    assert len(anthropic_upstream.calls("/v1/models")) >= 1


async def test_groq_translation_and_stream_usage(gw: Gateway, groq_upstream: GroqEmulator) -> None:
    named = pb.Message(role=pb.ROLE_USER, name="alice", content=[pb.ContentPart(text="Hi")])
    events = await collect(gw.stub.ChatStream(pb.ChatStreamRequest(model="llama-3.1-8b-instant", messages=[named])))
    final = events[-1].final
    assert final.usage.total_tokens == 18 and not final.usage.estimated  # from x_groq.usage
    assert [(w.code, w.field) for w in final.warnings] == [("OPTION_DROPPED", "messages[].name")]
    sent = groq_upstream.requests[-1]
    assert sent.path == "/openai/v1/chat/completions"
    assert sent.headers["Authorization"] == "Bearer gsk_secret123456789"
    assert "stream_options" not in sent.body and "name" not in sent.body["messages"][0]
    assert final.cost.priced and final.cost.total_usd > 0


@pytest.mark.parametrize(
    ("model", "code", "reason"),
    [
        ("status-400", grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED"),
        ("status-401", grpc.StatusCode.INTERNAL, "PROVIDER_AUTH_FAILED"),
        ("missing-model", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        ("status-413", grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED"),
        ("status-422", grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED"),
        ("status-429", grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED"),
        ("status-498", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("status-500", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("status-502", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("status-503", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("context-length", grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED"),
        ("content-filter", grpc.StatusCode.INVALID_ARGUMENT, "CONTENT_FILTERED"),
    ],
)
async def test_groq_error_table(
    gw: Gateway, groq_upstream: GroqEmulator, model: str, code: grpc.StatusCode, reason: str
) -> None:
    error = await expect_error(gw.stub.Chat(chat(f"groq/{model}")))
    assert (error.code, error.info.reason) == (code, reason)
    assert len(groq_upstream.calls("/chat/completions")) == 1  # SDK retries are off


async def test_embed_on_chat_only_providers_names_embedders(gw: Gateway) -> None:
    for model in ("claude-haiku-4-5", "groq/llama-3.1-8b-instant"):
        error = await expect_error(gw.stub.Embed(pb.EmbedRequest(model=model, inputs=["x"])))
        assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CAPABILITY_NOT_SUPPORTED")
        assert "text-embedding-3-small" in error.message


async def test_missing_keys_fail_at_start(make_gateway: GatewayFactory) -> None:
    from llm_gateway_server.config import ConfigError

    with pytest.raises(ConfigError, match="no API key"):
        await make_gateway({}, providers=[{"name": "anthropic", "kind": "anthropic", "api_key_env": "NOPE"}])


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_anthropic_base_url_with_or_without_v1(
    make_gateway: GatewayFactory, anthropic_upstream: AnthropicEmulator, suffix: str
) -> None:
    """`ANTHROPIC_BASE_URL=https://host/v1` is a common mistake (the SDK adds `/v1` itself): it
    used to make every call NOT_FOUND "POST /v1/v1/messages"; both forms are accepted."""
    gateway = await make_gateway(
        {"ANTHROPIC_API_KEY": "sk-ant-secret-123456789", "ANTHROPIC_BASE_URL": anthropic_upstream.base_url + suffix}
    )
    reply = await gateway.stub.Chat(chat("claude-haiku-4-5"))
    assert reply.provider == "anthropic"
    assert anthropic_upstream.requests[-1].path == "/v1/messages"


@pytest.mark.parametrize("suffix", ["", "/openai/v1"])
async def test_groq_base_url_with_or_without_api_prefix(
    make_gateway: GatewayFactory, groq_upstream: GroqEmulator, suffix: str
) -> None:
    gateway = await make_gateway(
        {"GROQ_API_KEY": "gsk_secret123456789", "GROQ_BASE_URL": groq_upstream.base_url + suffix}
    )
    reply = await gateway.stub.Chat(chat("llama-3.1-8b-instant"))
    assert reply.provider == "groq"
    assert groq_upstream.requests[-1].path == "/openai/v1/chat/completions"
