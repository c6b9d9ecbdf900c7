"""Table tests of `providers.openai_mapping` (also used by Groq): domain → Chat Completions body,
and completion / stream chunk / usage / error JSON → domain. Wire facts:
shared/reference/provider-wire-formats.md §1 (and §2 for Groq's usage and error bodies)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from llm_gateway_server.domain import (
    ChatDelta,
    ChatRequest,
    FinishReason,
    GenerationOptions,
    ImagePart,
    Message,
    ProviderChatResult,
    ResponseFormat,
    Role,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
)
from llm_gateway_server.providers import openai_mapping as om

PNG = b"\x89PNG\r\n\x1a\n"
PNG_B64 = base64.b64encode(PNG).decode("ascii")
HI = Message(Role.USER, (TextPart("hi"),))
WEATHER = Tool(
    "get_weather",
    "Weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
BASE_KEYS = ("model", "messages")


def _request(
    *messages: Message,
    tools: tuple[Tool, ...] = (),
    tool_choice: ToolChoice | None = None,
    end_user_id: str = "",
    **generation: Any,
) -> ChatRequest:
    return ChatRequest(
        model="alias",
        messages=messages or (HI,),
        tools=tools,
        tool_choice=tool_choice,
        generation=GenerationOptions(**generation),
        end_user_id=end_user_id,
    )


def _extras(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in BASE_KEYS}


def _warned(request: ChatRequest) -> list[tuple[str, str]]:
    return [(str(w.code), w.field) for w in om.chat_warnings(request)]


# --- request: messages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        pytest.param(
            Message(Role.SYSTEM, (TextPart("be brief"),)), {"role": "system", "content": "be brief"}, id="system"
        ),
        pytest.param(
            Message(Role.SYSTEM, (TextPart("be brief"),), name="ops"),
            {"role": "system", "content": "be brief", "name": "ops"},
            id="system-with-name",
        ),
        pytest.param(Message(Role.USER, (TextPart("hi"),)), {"role": "user", "content": "hi"}, id="user-text"),
        pytest.param(
            Message(Role.USER, (TextPart("a"), TextPart("b"))),
            {"role": "user", "content": "ab"},
            id="user-text-parts-joined-into-a-string",
        ),
        pytest.param(Message(Role.USER), {"role": "user", "content": ""}, id="user-no-content"),
        pytest.param(
            Message(Role.USER, (TextPart("hi"),), name="alice"),
            {"role": "user", "content": "hi", "name": "alice"},
            id="user-with-name",
        ),
        pytest.param(
            Message(Role.USER, (TextPart("what is this?"), ImagePart(url="https://example.com/cat.png"))),
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                ],
            },
            id="user-image-url",
        ),
        pytest.param(
            Message(Role.USER, (ImagePart(url="https://example.com/cat.png", detail="low"),)),
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}
                ],
            },
            id="user-image-url-detail",
        ),
        pytest.param(
            Message(Role.USER, (ImagePart(data=PNG, mime_type="image/png", detail="high"),)),
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "high"}}
                ],
            },
            id="user-image-bytes-become-data-url",
        ),
        pytest.param(
            Message(Role.USER, (ImagePart(url=f"data:image/png;base64,{PNG_B64}"),)),
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}],
            },
            id="user-data-url-passed-through",
        ),
        pytest.param(
            Message(Role.ASSISTANT, (TextPart("hello"),)), {"role": "assistant", "content": "hello"}, id="assistant"
        ),
        pytest.param(
            Message(Role.ASSISTANT, tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Paris"}'),)),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            id="assistant-tool-call-content-null",
        ),
        pytest.param(
            Message(
                Role.ASSISTANT,
                (TextPart("checking"),),
                tool_calls=(ToolCall("call_1", "a", "{}"), ToolCall("call_2", "b", '{"x": 1}')),
            ),
            {
                "role": "assistant",
                "content": "checking",
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "b", "arguments": '{"x": 1}'}},
                ],
            },
            id="assistant-text-and-parallel-tool-calls-arguments-verbatim",
        ),
        pytest.param(
            Message(Role.TOOL, (TextPart("15 degrees"),), tool_call_id="call_1"),
            {"role": "tool", "content": "15 degrees", "tool_call_id": "call_1"},
            id="tool-result",
        ),
        pytest.param(
            Message(Role.TOOL, (TextPart("15 degrees"),), tool_call_id="call_1", name="get_weather"),
            {"role": "tool", "content": "15 degrees", "tool_call_id": "call_1"},
            id="tool-result-name-not-sent",
        ),
    ],
)
def test_message_to_wire(message: Message, wire: dict[str, Any]) -> None:
    assert om.message_to_wire(message) == wire


def test_chat_params_keeps_message_order() -> None:
    messages = (
        Message(Role.SYSTEM, (TextPart("s"),)),
        HI,
        Message(Role.ASSISTANT, tool_calls=(ToolCall("c1", "f", "{}"),)),
        Message(Role.TOOL, (TextPart("r"),), tool_call_id="c1"),
    )
    params = om.chat_params(_request(*messages), "gpt-4o", stream=False)
    assert [m["role"] for m in params["messages"]] == ["system", "user", "assistant", "tool"]
    assert params["model"] == "gpt-4o"


# --- request: generation options -------------------------------------------------------------


def test_chat_params_unset_options_are_absent() -> None:
    params = om.chat_params(_request(), "gpt-4o", stream=False)
    assert params == {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("generation", "extras"),
    [
        pytest.param({"temperature": 0.7}, {"temperature": 0.7}, id="temperature"),
        pytest.param({"temperature": 0.0}, {"temperature": 0.0}, id="temperature-zero-is-set"),
        pytest.param({"top_p": 0.9}, {"top_p": 0.9}, id="top_p"),
        pytest.param({"max_output_tokens": 256}, {"max_tokens": 256}, id="max_output_tokens"),
        pytest.param({"stop_sequences": ("END",)}, {"stop": ["END"]}, id="one-stop-sequence"),
        pytest.param({"stop_sequences": ("\n\n", "###")}, {"stop": ["\n\n", "###"]}, id="stop-sequences"),
        pytest.param({"stop_sequences": ()}, {}, id="no-stop-sequences"),
        pytest.param({"seed": 42}, {"seed": 42}, id="seed"),
        pytest.param({"seed": 0}, {"seed": 0}, id="seed-zero-is-set"),
        pytest.param({"presence_penalty": -0.5}, {"presence_penalty": -0.5}, id="presence_penalty"),
        pytest.param({"frequency_penalty": 1.5}, {"frequency_penalty": 1.5}, id="frequency_penalty"),
        pytest.param({"top_k": 40}, {}, id="top_k-dropped"),
        pytest.param({"parallel_tool_calls": False}, {}, id="parallel_tool_calls-without-tools-dropped"),
        pytest.param({"response_format": ResponseFormat("text")}, {}, id="response-format-text"),
        pytest.param(
            {"response_format": ResponseFormat("json_object")},
            {"response_format": {"type": "json_object"}},
            id="response-format-json-object",
        ),
        pytest.param(
            {
                "response_format": ResponseFormat(
                    "json_schema",
                    schema_name="Answer",
                    schema_description="the answer",
                    schema={"type": "object", "properties": {"a": {"type": "string"}}},
                    strict=True,
                )
            },
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "Answer",
                        "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
                        "description": "the answer",
                        "strict": True,
                    },
                }
            },
            id="response-format-json-schema-full",
        ),
        pytest.param(
            {"response_format": ResponseFormat("json_schema", schema={"type": "object"})},
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "response", "schema": {"type": "object"}},
                }
            },
            id="response-format-json-schema-minimal",
        ),
    ],
)
def test_chat_params_generation_options(generation: dict[str, Any], extras: dict[str, Any]) -> None:
    assert _extras(om.chat_params(_request(**generation), "m", stream=False)) == extras


def test_chat_params_every_option_at_once() -> None:
    request = _request(
        tools=(WEATHER,),
        tool_choice=ToolChoice(mode="required"),
        end_user_id="user-7",
        temperature=0.2,
        top_p=0.8,
        top_k=5,
        max_output_tokens=64,
        stop_sequences=("X",),
        seed=7,
        presence_penalty=0.1,
        frequency_penalty=0.3,
        response_format=ResponseFormat("json_object"),
        parallel_tool_calls=True,
    )
    extras = _extras(om.chat_params(request, "m", stream=True))
    assert extras.pop("tools")[0]["function"]["name"] == "get_weather"
    assert extras == {
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
        "top_p": 0.8,
        "max_tokens": 64,
        "stop": ["X"],
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.3,
        "response_format": {"type": "json_object"},
        "parallel_tool_calls": True,
        "tool_choice": "required",
        "user": "user-7",
    }


@pytest.mark.parametrize(
    ("stream", "extras"),
    [
        pytest.param(False, {}, id="unary"),
        pytest.param(True, {"stream": True, "stream_options": {"include_usage": True}}, id="stream-asks-for-usage"),
    ],
)
def test_chat_params_stream(stream: bool, extras: dict[str, Any]) -> None:
    assert _extras(om.chat_params(_request(), "m", stream=stream)) == extras


@pytest.mark.parametrize(
    ("end_user_id", "extras"),
    [pytest.param("", {}, id="no-user"), pytest.param("u-1", {"user": "u-1"}, id="end-user-id")],
)
def test_chat_params_end_user(end_user_id: str, extras: dict[str, Any]) -> None:
    assert _extras(om.chat_params(_request(end_user_id=end_user_id), "m", stream=False)) == extras


# --- request: tools and tool_choice ----------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "wire"),
    [
        pytest.param(
            WEATHER,
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                    "description": "Weather for a city",
                },
            },
            id="with-description-and-schema",
        ),
        pytest.param(
            Tool("now"),
            {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
            id="no-arguments-gets-empty-object-schema",
        ),
        pytest.param(
            Tool("f", parameters={"type": "object"}, strict=True),
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}},
            id="strict",
        ),
    ],
)
def test_tool_to_wire(tool: Tool, wire: dict[str, Any]) -> None:
    assert om.chat_params(_request(tools=(tool,)), "m", stream=False)["tools"] == [wire]


@pytest.mark.parametrize(
    ("tools", "choice", "parallel", "extras"),
    [
        pytest.param((WEATHER,), None, None, {}, id="no-choice-means-provider-default"),
        pytest.param((WEATHER,), ToolChoice(), None, {}, id="empty-choice-means-auto"),
        pytest.param((WEATHER,), ToolChoice(mode="auto"), None, {"tool_choice": "auto"}, id="auto"),
        pytest.param((WEATHER,), ToolChoice(mode="none"), None, {"tool_choice": "none"}, id="none"),
        pytest.param((WEATHER,), ToolChoice(mode="required"), None, {"tool_choice": "required"}, id="required"),
        pytest.param(
            (WEATHER,),
            ToolChoice(function_name="get_weather"),
            None,
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            id="forced-function",
        ),
        pytest.param(
            (WEATHER,),
            ToolChoice(mode="auto", function_name="get_weather"),
            None,
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            id="forced-function-wins-over-mode",
        ),
        pytest.param((WEATHER,), None, False, {"parallel_tool_calls": False}, id="parallel-false"),
        pytest.param((WEATHER,), None, True, {"parallel_tool_calls": True}, id="parallel-true"),
        pytest.param((), ToolChoice(mode="required"), None, {}, id="choice-without-tools-not-sent"),
        pytest.param((), None, True, {}, id="parallel-without-tools-not-sent"),
    ],
)
def test_tool_choice_and_parallel(
    tools: tuple[Tool, ...], choice: ToolChoice | None, parallel: bool | None, extras: dict[str, Any]
) -> None:
    params = _extras(
        om.chat_params(_request(tools=tools, tool_choice=choice, parallel_tool_calls=parallel), "m", stream=False)
    )
    params.pop("tools", None)
    assert params == extras


# --- request: warnings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "warned"),
    [
        pytest.param(_request(), [], id="nothing-dropped"),
        pytest.param(
            _request(
                temperature=1.0,
                top_p=0.5,
                max_output_tokens=5,
                seed=1,
                presence_penalty=0.0,
                frequency_penalty=0.0,
                stop_sequences=("x",),
                response_format=ResponseFormat("json_object"),
            ),
            [],
            id="supported-options-not-warned",
        ),
        pytest.param(_request(top_k=40), [("OPTION_DROPPED", "generation.top_k")], id="top_k"),
        pytest.param(
            _request(parallel_tool_calls=False),
            [("OPTION_DROPPED", "generation.parallel_tool_calls")],
            id="parallel-without-tools",
        ),
        pytest.param(_request(tools=(WEATHER,), parallel_tool_calls=False), [], id="parallel-with-tools"),
        pytest.param(
            _request(top_k=1, parallel_tool_calls=True),
            [("OPTION_DROPPED", "generation.top_k"), ("OPTION_DROPPED", "generation.parallel_tool_calls")],
            id="both",
        ),
    ],
)
def test_chat_warnings(request_: ChatRequest, warned: list[tuple[str, str]]) -> None:
    assert _warned(request_) == warned


def test_warnings_have_a_message() -> None:
    assert all(w.message for w in om.chat_warnings(_request(top_k=1, parallel_tool_calls=True)))


# --- response: finish reasons ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("stop", FinishReason.STOP, id="stop"),
        pytest.param("length", FinishReason.LENGTH, id="length"),
        pytest.param("tool_calls", FinishReason.TOOL_CALLS, id="tool_calls"),
        pytest.param("function_call", FinishReason.TOOL_CALLS, id="function_call-legacy"),
        pytest.param("content_filter", FinishReason.CONTENT_FILTER, id="content_filter"),
        pytest.param("something_new", FinishReason.OTHER, id="unknown"),
        pytest.param("", FinishReason.OTHER, id="empty"),
        pytest.param(None, FinishReason.OTHER, id="null"),
    ],
)
def test_finish_reason(raw: str | None, expected: FinishReason) -> None:
    assert om.finish_reason(raw) is expected


# --- response: usage -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        pytest.param(
            {
                "prompt_tokens": 14,
                "completion_tokens": 37,
                "total_tokens": 51,
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
            Usage(input_tokens=14, output_tokens=37),
            id="recorded-completion",
        ),
        pytest.param(
            {
                "prompt_tokens": 2006,
                "completion_tokens": 300,
                "total_tokens": 2306,
                "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0},
            },
            Usage(input_tokens=2006, output_tokens=300, cached_input_tokens=1920, reasoning_tokens=192),
            id="cached-and-reasoning-tokens",
        ),
        pytest.param(
            {
                "prompt_tokens": 5,
                "completion_tokens": 1,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            Usage(input_tokens=5, output_tokens=1),
            id="null-details",
        ),
        pytest.param(
            {
                "queue_time": 0.037,
                "prompt_tokens": 18,
                "prompt_time": 0.0007,
                "completion_tokens": 3,
                "completion_time": 0.0027,
                "total_tokens": 21,
                "total_time": 0.0034,
            },
            Usage(input_tokens=18, output_tokens=3),
            id="groq-usage-with-timings",
        ),
        pytest.param({"prompt_tokens": None, "completion_tokens": None}, Usage(), id="null-counts"),
        pytest.param({}, Usage(), id="empty-object"),
        pytest.param(None, None, id="missing"),
        pytest.param([1, 2], None, id="not-an-object"),
        pytest.param(
            {"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": {"cache_write_tokens": 80}},
            Usage(input_tokens=100, output_tokens=5, cache_creation_input_tokens=80),
            id="cache-write-tokens",
        ),
    ],
)
def test_usage_from_wire(usage: Any, expected: Usage | None) -> None:
    result = om.usage_from_wire(usage)
    assert result == expected
    if result is not None:
        assert not result.estimated


# --- response: tool calls and completions ----------------------------------------------------


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        pytest.param(None, (), id="null"),
        pytest.param([], (), id="empty"),
        pytest.param(
            [
                {
                    "id": "call_Y6qJ7ofLgOrBnMD5WbVAeiRV",
                    "type": "function",
                    "function": {"name": "GetWeatherArgs", "arguments": '{"city":"Edinburgh","country":"UK"}'},
                }
            ],
            (ToolCall("call_Y6qJ7ofLgOrBnMD5WbVAeiRV", "GetWeatherArgs", '{"city":"Edinburgh","country":"UK"}'),),
            id="recorded-call",
        ),
        pytest.param(
            [
                {"id": "c1", "type": "function", "function": {"name": "a", "arguments": '{ "x" : 1 }'}},
                {"id": "c2", "type": "function", "function": {"name": "b", "arguments": ""}},
            ],
            (ToolCall("c1", "a", '{ "x" : 1 }'), ToolCall("c2", "b", "")),
            id="parallel-arguments-text-verbatim",
        ),
        pytest.param(
            [{"type": "custom", "custom": {"name": "x", "input": "y"}}, {"id": "c", "function": {"name": "f"}}],
            (ToolCall("c", "f", ""),),
            id="non-function-entries-skipped",
        ),
        pytest.param([{"function": {"name": "f", "arguments": "{}"}}], (ToolCall("", "f", "{}"),), id="missing-id"),
    ],
)
def test_tool_calls_from_wire(calls: Any, expected: tuple[ToolCall, ...]) -> None:
    assert om.tool_calls_from_wire(calls) == expected


def _completion(message: dict[str, Any], finish: str | None = "stop", **top: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1727346142,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {"index": 0, "message": {"role": "assistant", **message}, "logprobs": None, "finish_reason": finish}
        ],
        "usage": {"prompt_tokens": 14, "completion_tokens": 37, "total_tokens": 51},
    }
    body.update(top)
    return body


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            _completion({"content": "Hello!", "refusal": None}),
            ProviderChatResult(
                model="gpt-4o-2024-08-06",
                text="Hello!",
                tool_calls=(),
                finish_reason=FinishReason.STOP,
                provider_finish_reason="stop",
                usage=Usage(input_tokens=14, output_tokens=37),
                response_id="chatcmpl-1",
            ),
            id="text",
        ),
        pytest.param(
            _completion(
                {
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                    ],
                },
                "tool_calls",
                usage={"prompt_tokens": 76, "completion_tokens": 24, "total_tokens": 100},
            ),
            ProviderChatResult(
                model="gpt-4o-2024-08-06",
                text="",
                tool_calls=(ToolCall("call_1", "get_weather", "{}"),),
                finish_reason=FinishReason.TOOL_CALLS,
                provider_finish_reason="tool_calls",
                usage=Usage(input_tokens=76, output_tokens=24),
                response_id="chatcmpl-1",
            ),
            id="tool-calls-content-null",
        ),
        pytest.param(
            _completion({"content": "Hel"}, "length", usage=None),
            ProviderChatResult(
                model="gpt-4o-2024-08-06",
                text="Hel",
                tool_calls=(),
                finish_reason=FinishReason.LENGTH,
                provider_finish_reason="length",
                usage=None,
                response_id="chatcmpl-1",
            ),
            id="length-usage-null",
        ),
        pytest.param(
            {
                k: v
                for k, v in _completion({"content": ""}, "content_filter").items()
                if k not in ("usage", "model", "id")
            },
            ProviderChatResult(
                model="requested-model",
                text="",
                tool_calls=(),
                finish_reason=FinishReason.CONTENT_FILTER,
                provider_finish_reason="content_filter",
                usage=None,
                response_id="",
            ),
            id="content-filter-no-usage-no-model-no-id",
        ),
        pytest.param(
            _completion({"content": "x"}, None),
            ProviderChatResult(
                model="gpt-4o-2024-08-06",
                text="x",
                tool_calls=(),
                finish_reason=FinishReason.OTHER,
                provider_finish_reason="",
                usage=Usage(input_tokens=14, output_tokens=37),
                response_id="chatcmpl-1",
            ),
            id="null-finish-reason",
        ),
        pytest.param(
            _completion(
                {"content": "first"},
                choices=[
                    {"index": 0, "message": {"role": "assistant", "content": "first"}, "finish_reason": "stop"},
                    {"index": 1, "message": {"role": "assistant", "content": "second"}, "finish_reason": "length"},
                ],
            ),
            ProviderChatResult(
                model="gpt-4o-2024-08-06",
                text="first",
                tool_calls=(),
                finish_reason=FinishReason.STOP,
                provider_finish_reason="stop",
                usage=Usage(input_tokens=14, output_tokens=37),
                response_id="chatcmpl-1",
            ),
            id="n-choices-first-wins",
        ),
    ],
)
def test_completion_from_wire(body: dict[str, Any], expected: ProviderChatResult) -> None:
    assert om.completion_from_wire(body, "requested-model") == expected


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"id": "x", "choices": []}, id="empty-choices"),
        pytest.param({"id": "x"}, id="no-choices"),
        pytest.param({"error": {"message": "boom"}}, id="error-body"),
        pytest.param([], id="not-an-object"),
        pytest.param(None, id="null"),
    ],
)
def test_completion_from_wire_rejects_non_completions(body: Any) -> None:
    with pytest.raises(ValueError, match="no choices"):
        om.completion_from_wire(body, "m")


# --- response: stream chunks -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        pytest.param(
            {"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None}, "finish_reason": None},
            None,
            id="first-chunk-role-only",
        ),
        pytest.param({"index": 0, "delta": {"content": '{"'}, "finish_reason": None}, ChatDelta(text='{"'), id="text"),
        pytest.param({"index": 0, "delta": {}, "finish_reason": "length"}, None, id="finish-chunk-empty-delta"),
        pytest.param({"index": 0, "finish_reason": "stop"}, None, id="no-delta"),
        pytest.param({"index": 0, "delta": None}, None, id="null-delta"),
        pytest.param(
            {
                "index": 0,
                "delta": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_4XzlGBLtUe9dy3GVNV4jhq7h",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ],
                    "refusal": None,
                },
            },
            ChatDelta(tool_calls=(ToolCallDelta(index=0, id="call_4XzlGBLtUe9dy3GVNV4jhq7h", name="get_weather"),)),
            id="tool-call-first-fragment",
        ),
        pytest.param(
            {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"'}}]}},
            ChatDelta(tool_calls=(ToolCallDelta(index=0, arguments='{"'),)),
            id="tool-call-arguments-fragment",
        ),
        pytest.param(
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "b", "arguments": "{}"}}
                    ]
                },
            },
            ChatDelta(tool_calls=(ToolCallDelta(index=1, id="call_b", name="b", arguments="{}"),)),
            id="parallel-tool-call-index-1",
        ),
        pytest.param(
            {"index": 0, "delta": {"content": "Hi", "tool_calls": [{"index": 0, "function": {"arguments": "x"}}]}},
            ChatDelta(text="Hi", tool_calls=(ToolCallDelta(index=0, arguments="x"),)),
            id="text-and-tool-fragment",
        ),
        pytest.param({"index": 0, "delta": {"tool_calls": []}}, None, id="empty-tool-calls"),
    ],
)
def test_delta_from_chunk(choice: dict[str, Any], expected: ChatDelta | None) -> None:
    assert om.delta_from_chunk(choice) == expected


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            {
                "message": "Incorrect API key provided: sk-abc***xyz.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            },
            ("Incorrect API key provided: sk-abc***xyz.", "invalid_api_key"),
            id="openai-sdk-inner-body-code",
        ),
        pytest.param(
            {"message": "The server had an error", "type": "server_error", "param": None, "code": None},
            ("The server had an error", "server_error"),
            id="code-null-falls-back-to-type",
        ),
        pytest.param(
            {
                "message": "You exceeded your current quota",
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            },
            ("You exceeded your current quota", "insufficient_quota"),
            id="insufficient-quota",
        ),
        pytest.param(
            {"error": {"message": "Rate limit reached", "type": "tokens", "code": "rate_limit_exceeded"}},
            ("Rate limit reached", "rate_limit_exceeded"),
            id="groq-whole-document",
        ),
        pytest.param(
            {"error": {"message": "boom", "type": "server_error"}}, ("boom", "server_error"), id="sse-error-chunk"
        ),
        pytest.param(
            {"error": {"message": "model not found", "type": "not_found_error", "param": None, "code": None}},
            ("model not found", "not_found_error"),
            id="ollama-compat-error",
        ),
        pytest.param(
            {"error": {"message": "context too long", "code": "context_length_exceeded"}},
            ("context too long", "context_length_exceeded"),
            id="context-length",
        ),
        pytest.param({"error": "upstream exploded"}, ("upstream exploded", ""), id="error-string"),
        pytest.param("Bad Gateway", ("Bad Gateway", ""), id="plain-text-body"),
        pytest.param(None, ("", ""), id="no-body"),
        pytest.param(42, ("", ""), id="odd-body"),
    ],
)
def test_error_fields(body: object, expected: tuple[str, str]) -> None:
    assert om.error_fields(body) == expected


def test_error_fields_non_string_message_is_json_of_the_error() -> None:
    message, code = om.error_fields({"error": {"message": {"detail": "x"}, "code": 17}})
    assert code == "17"
    assert '"detail": "x"' in message
