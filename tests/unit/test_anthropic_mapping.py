"""Table tests of `providers.anthropic_mapping`: domain → Messages API keyword arguments, and SDK
response objects (built from wire JSON with the installed SDK's own models) → domain. Wire facts:
shared/reference/provider-wire-formats.md §3."""

from __future__ import annotations

import base64
from typing import Any

import anthropic
import pytest

from llm_gateway_server.domain import (
    ChatRequest,
    FinishReason,
    GenerationOptions,
    ImagePart,
    Message,
    ResponseFormat,
    Role,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
    Usage,
)
from llm_gateway_server.providers import anthropic_mapping as am

PNG = b"\x89PNG\r\n\x1a\n"
PNG_B64 = base64.b64encode(PNG).decode("ascii")
HI = Message(Role.USER, (TextPart("hi"),))
WEATHER = Tool("get_weather", "Weather for a city", {"type": "object", "properties": {"city": {"type": "string"}}})
BASE_KEYS = ("model", "max_tokens", "messages")


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


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _user(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def _message(content: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """A response as it comes over the wire (reference §3.3), checked against the SDK's own model
    of a Message so that the shape stays the real one."""
    message = {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-20250514",
        "content": content,
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 1, "output_tokens": 1},
    }
    anthropic.types.Message.model_validate(message)
    return message


# --- request: messages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "system", "wire"),
    [
        pytest.param((HI,), "", [_user(_text("hi"))], id="user"),
        pytest.param(
            (Message(Role.SYSTEM, (TextPart("be brief"),)), HI), "be brief", [_user(_text("hi"))], id="system-hoisted"
        ),
        pytest.param(
            (
                Message(Role.SYSTEM, (TextPart("one"),)),
                HI,
                Message(Role.SYSTEM, (TextPart("two"),)),
            ),
            "one\n\ntwo",
            [_user(_text("hi"))],
            id="system-messages-joined",
        ),
        pytest.param(
            (HI, Message(Role.ASSISTANT, (TextPart("hello"),))),
            "",
            [_user(_text("hi")), {"role": "assistant", "content": [_text("hello")]}],
            id="assistant",
        ),
        pytest.param(
            (Message(Role.USER, (TextPart(""), TextPart("a"), TextPart("b"))),),
            "",
            [_user(_text("a"), _text("b"))],
            id="text-parts-kept-separate-empty-skipped",
        ),
        pytest.param(
            (Message(Role.USER, (TextPart("what?"), ImagePart(url="https://example.com/cat.png"))),),
            "",
            [_user(_text("what?"), {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}})],
            id="image-url",
        ),
        pytest.param(
            (Message(Role.USER, (ImagePart(url=f"data:image/png;base64,{PNG_B64}"),)),),
            "",
            [_user({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}})],
            id="image-data-url-becomes-base64-source",
        ),
        pytest.param(
            (Message(Role.USER, (ImagePart(data=PNG, mime_type="image/png"),)),),
            "",
            [_user({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}})],
            id="image-bytes",
        ),
        pytest.param(
            (HI, Message(Role.ASSISTANT, tool_calls=(ToolCall("toolu_1", "get_weather", '{"city":"Paris"}'),))),
            "",
            [
                _user(_text("hi")),
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                    ],
                },
            ],
            id="assistant-tool-use-input-is-an-object",
        ),
        pytest.param(
            (Message(Role.ASSISTANT, (TextPart("checking"),), tool_calls=(ToolCall("t1", "now", ""),)),),
            "",
            [
                {
                    "role": "assistant",
                    "content": [_text("checking"), {"type": "tool_use", "id": "t1", "name": "now", "input": {}}],
                }
            ],
            id="assistant-text-then-tool-use-empty-arguments",
        ),
        pytest.param(
            (Message(Role.ASSISTANT, tool_calls=(ToolCall("t1", "f", "not json"), ToolCall("t2", "g", "[1]"))),),
            "",
            [
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
                        {"type": "tool_use", "id": "t2", "name": "g", "input": {}},
                    ],
                }
            ],
            id="unusable-arguments-become-empty-input",
        ),
        pytest.param(
            (Message(Role.TOOL, (TextPart("15 degrees"),), tool_call_id="toolu_1"),),
            "",
            [_user({"type": "tool_result", "tool_use_id": "toolu_1", "content": "15 degrees"})],
            id="tool-result-in-user-turn",
        ),
        pytest.param(
            (
                Message(Role.TOOL, (TextPart("a"),), tool_call_id="t1"),
                Message(Role.TOOL, (TextPart("b"),), tool_call_id="t2"),
            ),
            "",
            [
                _user(
                    {"type": "tool_result", "tool_use_id": "t1", "content": "a"},
                    {"type": "tool_result", "tool_use_id": "t2", "content": "b"},
                )
            ],
            id="consecutive-tool-results-merged",
        ),
        pytest.param(
            (
                Message(Role.SYSTEM, (TextPart("s"),)),
                HI,
                Message(Role.ASSISTANT, tool_calls=(ToolCall("t1", "f", "{}"), ToolCall("t2", "g", "{}"))),
                Message(Role.TOOL, (TextPart("a"),), tool_call_id="t1"),
                Message(Role.TOOL, (TextPart("b"),), tool_call_id="t2"),
                Message(Role.ASSISTANT, (TextPart("done"),)),
                Message(Role.TOOL, (TextPart("c"),), tool_call_id="t3"),
                Message(Role.USER, (TextPart("thanks"),)),
            ),
            "s",
            [
                _user(_text("hi")),
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
                        {"type": "tool_use", "id": "t2", "name": "g", "input": {}},
                    ],
                },
                _user(
                    {"type": "tool_result", "tool_use_id": "t1", "content": "a"},
                    {"type": "tool_result", "tool_use_id": "t2", "content": "b"},
                ),
                {"role": "assistant", "content": [_text("done")]},
                _user({"type": "tool_result", "tool_use_id": "t3", "content": "c"}),
                _user(_text("thanks")),
            ],
            id="conversation",
        ),
    ],
)
def test_messages_to_wire(messages: tuple[Message, ...], system: str, wire: list[dict[str, Any]]) -> None:
    assert am.messages_to_wire(messages) == (system, wire)


@pytest.mark.parametrize(
    ("messages", "extras"),
    [
        pytest.param((HI,), {}, id="no-system"),
        pytest.param((Message(Role.SYSTEM, (TextPart("be brief"),)), HI), {"system": "be brief"}, id="system"),
    ],
)
def test_chat_params_system(messages: tuple[Message, ...], extras: dict[str, Any]) -> None:
    assert _extras(am.chat_params(_request(*messages), "claude-x")) == extras


# --- request: generation options -------------------------------------------------------------


def test_chat_params_unset_options_are_absent() -> None:
    assert am.chat_params(_request(), "claude-x") == {
        "model": "claude-x",
        "max_tokens": am.DEFAULT_MAX_TOKENS,
        "messages": [_user(_text("hi"))],
    }


@pytest.mark.parametrize(
    ("max_output_tokens", "expected"),
    [
        pytest.param(None, am.DEFAULT_MAX_TOKENS, id="unset-uses-default-required-by-anthropic"),
        pytest.param(256, 256, id="set"),
    ],
)
def test_chat_params_max_tokens(max_output_tokens: int | None, expected: int) -> None:
    assert am.chat_params(_request(max_output_tokens=max_output_tokens), "c")["max_tokens"] == expected


@pytest.mark.parametrize(
    ("generation", "extras"),
    [
        pytest.param({"temperature": 0.5}, {}, id="temperature-dropped"),
        pytest.param({"top_p": 0.9}, {}, id="top_p-dropped"),
        pytest.param({"top_k": 5}, {}, id="top_k-dropped"),
        pytest.param({"seed": 1}, {}, id="seed-dropped"),
        pytest.param({"presence_penalty": 0.5}, {}, id="presence_penalty-dropped"),
        pytest.param({"frequency_penalty": 0.5}, {}, id="frequency_penalty-dropped"),
        pytest.param({"parallel_tool_calls": False}, {}, id="parallel-without-tools-dropped"),
        pytest.param({"stop_sequences": ("END",)}, {"stop_sequences": ["END"]}, id="stop-sequence"),
        pytest.param({"stop_sequences": ("a", "b")}, {"stop_sequences": ["a", "b"]}, id="stop-sequences"),
        pytest.param({"response_format": ResponseFormat("text")}, {}, id="response-format-text"),
        pytest.param(
            {"response_format": ResponseFormat("json_object")},
            {"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
            id="response-format-json-object",
        ),
        pytest.param(
            {
                "response_format": ResponseFormat(
                    "json_schema", schema_name="Answer", schema={"type": "object", "properties": {"a": {}}}, strict=True
                )
            },
            {
                "output_config": {
                    "format": {"type": "json_schema", "schema": {"type": "object", "properties": {"a": {}}}}
                }
            },
            id="response-format-json-schema",
        ),
    ],
)
def test_chat_params_generation_options(generation: dict[str, Any], extras: dict[str, Any]) -> None:
    assert _extras(am.chat_params(_request(**generation), "c")) == extras


@pytest.mark.parametrize(
    ("end_user_id", "extras"),
    [pytest.param("", {}, id="no-user"), pytest.param("u-1", {"metadata": {"user_id": "u-1"}}, id="end-user-id")],
)
def test_chat_params_end_user(end_user_id: str, extras: dict[str, Any]) -> None:
    assert _extras(am.chat_params(_request(end_user_id=end_user_id), "c")) == extras


# --- request: tools and tool_choice ----------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "wire"),
    [
        pytest.param(
            WEATHER,
            {
                "name": "get_weather",
                "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
            id="with-schema",
        ),
        pytest.param(
            Tool("now"),
            {"name": "now", "description": "", "input_schema": {"type": "object", "properties": {}}},
            id="no-arguments-gets-empty-object-schema",
        ),
        pytest.param(
            Tool("f", parameters={"type": "object"}, strict=True),
            {"name": "f", "description": "", "input_schema": {"type": "object"}, "strict": True},
            id="strict",
        ),
    ],
)
def test_tool_to_wire(tool: Tool, wire: dict[str, Any]) -> None:
    assert am.chat_params(_request(tools=(tool,)), "c")["tools"] == [wire]


@pytest.mark.parametrize(
    ("choice", "parallel", "wire"),
    [
        pytest.param(None, None, {"type": "auto"}, id="no-choice-is-auto"),
        pytest.param(ToolChoice(), None, {"type": "auto"}, id="empty-choice-is-auto"),
        pytest.param(ToolChoice(mode="auto"), None, {"type": "auto"}, id="auto"),
        pytest.param(ToolChoice(mode="required"), None, {"type": "any"}, id="required-is-any"),
        pytest.param(ToolChoice(mode="none"), None, {"type": "none"}, id="none"),
        pytest.param(
            ToolChoice(function_name="get_weather"), None, {"type": "tool", "name": "get_weather"}, id="forced"
        ),
        pytest.param(
            ToolChoice(mode="none", function_name="get_weather"),
            None,
            {"type": "tool", "name": "get_weather"},
            id="forced-wins-over-mode",
        ),
        pytest.param(None, True, {"type": "auto"}, id="parallel-true-is-default"),
        pytest.param(None, False, {"type": "auto", "disable_parallel_tool_use": True}, id="auto-parallel-false"),
        pytest.param(
            ToolChoice(mode="required"),
            False,
            {"type": "any", "disable_parallel_tool_use": True},
            id="any-parallel-false",
        ),
        pytest.param(
            ToolChoice(function_name="f"),
            False,
            {"type": "tool", "name": "f", "disable_parallel_tool_use": True},
            id="forced-parallel-false",
        ),
        pytest.param(ToolChoice(mode="none"), False, {"type": "none"}, id="none-has-no-parallel-flag"),
    ],
)
def test_tool_choice(choice: ToolChoice | None, parallel: bool | None, wire: dict[str, Any]) -> None:
    params = am.chat_params(_request(tools=(WEATHER,), tool_choice=choice, parallel_tool_calls=parallel), "c")
    assert params["tool_choice"] == wire


def test_tool_choice_without_tools_not_sent() -> None:
    params = am.chat_params(_request(tool_choice=ToolChoice(mode="required"), parallel_tool_calls=False), "c")
    assert "tools" not in params
    assert "tool_choice" not in params


# --- request: warnings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "fields"),
    [
        pytest.param({}, [], id="nothing-dropped"),
        pytest.param(
            {"max_output_tokens": 5, "stop_sequences": ("x",), "response_format": ResponseFormat("json_object")},
            [],
            id="supported-options-not-warned",
        ),
        pytest.param({"temperature": 0.0}, ["generation.temperature"], id="temperature-zero"),
        pytest.param({"top_p": 0.9}, ["generation.top_p"], id="top_p"),
        pytest.param({"top_k": 5}, ["generation.top_k"], id="top_k"),
        pytest.param({"seed": 0}, ["generation.seed"], id="seed"),
        pytest.param({"presence_penalty": 0.1}, ["generation.presence_penalty"], id="presence_penalty"),
        pytest.param({"frequency_penalty": 0.1}, ["generation.frequency_penalty"], id="frequency_penalty"),
        pytest.param(
            {
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": 1,
                "seed": 1,
                "presence_penalty": 1.0,
                "frequency_penalty": 1.0,
            },
            [
                "generation.temperature",
                "generation.top_p",
                "generation.top_k",
                "generation.seed",
                "generation.presence_penalty",
                "generation.frequency_penalty",
            ],
            id="all-dropped",
        ),
    ],
)
def test_chat_warnings(generation: dict[str, Any], fields: list[str]) -> None:
    warnings = am.chat_warnings(_request(**generation))
    assert [w.field for w in warnings] == fields
    assert all(str(w.code) == "OPTION_DROPPED" and w.message for w in warnings)


# --- response: finish reasons ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("end_turn", FinishReason.STOP, id="end_turn"),
        pytest.param("stop_sequence", FinishReason.STOP, id="stop_sequence"),
        pytest.param("max_tokens", FinishReason.LENGTH, id="max_tokens"),
        pytest.param("model_context_window_exceeded", FinishReason.LENGTH, id="model_context_window_exceeded"),
        pytest.param("tool_use", FinishReason.TOOL_CALLS, id="tool_use"),
        pytest.param("refusal", FinishReason.CONTENT_FILTER, id="refusal"),
        pytest.param("pause_turn", FinishReason.OTHER, id="pause_turn"),
        pytest.param("something_new", FinishReason.OTHER, id="unknown"),
        pytest.param(None, FinishReason.OTHER, id="null"),
    ],
)
def test_finish_reason(raw: str | None, expected: FinishReason) -> None:
    assert am.finish_reason(raw) is expected


# --- response: usage -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "output_tokens", "expected"),
    [
        pytest.param(
            {
                "input_tokens": 377,
                "output_tokens": 65,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                "service_tier": "standard",
            },
            None,
            Usage(input_tokens=377, output_tokens=65),
            id="recorded-response",
        ),
        pytest.param({"input_tokens": 11, "output_tokens": 1}, None, Usage(11, 1), id="no-cache-fields"),
        pytest.param(
            {
                "input_tokens": 10,
                "output_tokens": 20,
                "cache_read_input_tokens": 1000,
                "cache_creation_input_tokens": 50,
            },
            None,
            Usage(input_tokens=1060, output_tokens=20, cached_input_tokens=1000, cache_creation_input_tokens=50),
            id="input-includes-cache-reads-and-writes",
        ),
        pytest.param(
            {
                "input_tokens": 5,
                "output_tokens": 0,
                "cache_read_input_tokens": None,
                "cache_creation_input_tokens": None,
            },
            None,
            Usage(input_tokens=5),
            id="null-cache-fields",
        ),
        pytest.param(
            {"input_tokens": 11, "output_tokens": 1}, 6, Usage(11, 6), id="stream-message-delta-output-tokens-win"
        ),
        pytest.param({"input_tokens": 11, "output_tokens": 1}, 0, Usage(11, 0), id="stream-zero-output-tokens"),
    ],
)
def test_usage_from_wire(usage: dict[str, Any], output_tokens: int | None, expected: Usage) -> None:
    assert am.usage_from_wire(usage, output_tokens) == expected


# --- response: content -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param([], ("", ()), id="empty"),
        pytest.param([_text("Hello!")], ("Hello!", ()), id="text"),
        pytest.param([_text("Hello"), _text(" there")], ("Hello there", ()), id="text-blocks-concatenated"),
        pytest.param(
            [
                _text("I'll check the weather."),
                {
                    "type": "tool_use",
                    "id": "toolu_01NRLabsLyVHZPKxbKvkfSMn",
                    "name": "get_weather",
                    "input": {"location": "Paris"},
                },
            ],
            (
                "I'll check the weather.",
                (ToolCall("toolu_01NRLabsLyVHZPKxbKvkfSMn", "get_weather", '{"location":"Paris"}'),),
            ),
            id="recorded-text-and-tool-use",
        ),
        pytest.param(
            [
                {"type": "tool_use", "id": "t1", "name": "a", "input": {}},
                {"type": "tool_use", "id": "t2", "name": "b", "input": {"x": [1, 2], "y": {"z": None}}},
            ],
            ("", (ToolCall("t1", "a", "{}"), ToolCall("t2", "b", '{"x":[1,2],"y":{"z":null}}'))),
            id="parallel-tool-use-compact-json",
        ),
        pytest.param(
            [{"type": "thinking", "thinking": "hmm", "signature": "sig"}, _text("42")],
            ("42", ()),
            id="thinking-skipped",
        ),
        pytest.param(
            [{"type": "redacted_thinking", "data": "opaque"}, _text("ok")], ("ok", ()), id="redacted-thinking-skipped"
        ),
    ],
)
def test_content_from_wire(content: list[dict[str, Any]], expected: tuple[str, tuple[ToolCall, ...]]) -> None:
    assert am.content_from_wire(content) == expected


def test_content_from_wire_none() -> None:
    assert am.content_from_wire(None) == ("", ())


def test_message_from_wire() -> None:
    content = [_text("Hi"), {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]
    message = {**_message(content, {"input_tokens": 7, "output_tokens": 3}), "stop_reason": "tool_use"}
    result = am.message_from_wire(message, "fallback-model")
    assert result.model == "claude-sonnet-4-20250514"
    assert (result.text, result.tool_calls) == ("Hi", (ToolCall("t1", "f", '{"a":1}'),))
    assert (result.finish_reason, result.provider_finish_reason) == (FinishReason.TOOL_CALLS, "tool_use")
    assert result.usage == Usage(7, 3)
    assert result.response_id == "msg_013Zva2CMHLNnXjNJJKqJ2EF"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param([], id="not-an-object"),
        pytest.param({"content": [{"type": "text"}]}, id="text-block-without-text"),
        pytest.param({"content": [{"type": "tool_use", "name": "f"}]}, id="tool-use-without-id"),
    ],
)
def test_message_from_wire_refuses_malformed_answers(body: Any) -> None:
    with pytest.raises((TypeError, KeyError)):
        am.message_from_wire(body, "m")


# --- errors ----------------------------------------------------------------------------------


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            _error("invalid_request_error", "max_tokens: Field required"),
            ("max_tokens: Field required", "invalid_request_error"),
            id="400-invalid-request",
        ),
        pytest.param(
            _error("invalid_request_error", "temperature: Extra inputs are not permitted"),
            ("temperature: Extra inputs are not permitted", "invalid_request_error"),
            id="400-extra-inputs",
        ),
        pytest.param(
            _error("authentication_error", "invalid x-api-key"),
            ("invalid x-api-key", "authentication_error"),
            id="401-authentication",
        ),
        pytest.param(_error("billing_error", "low balance"), ("low balance", "billing_error"), id="402-billing"),
        pytest.param(_error("permission_error", "no"), ("no", "permission_error"), id="403-permission"),
        pytest.param(
            _error("not_found_error", "model: claude-foo"), ("model: claude-foo", "not_found_error"), id="404-not-found"
        ),
        pytest.param(
            _error("request_too_large", "Request exceeds the maximum size"),
            ("Request exceeds the maximum size", "request_too_large"),
            id="413-request-too-large",
        ),
        pytest.param(
            _error("rate_limit_error", "Number of requests has exceeded your rate limit"),
            ("Number of requests has exceeded your rate limit", "rate_limit_error"),
            id="429-rate-limit",
        ),
        pytest.param(_error("api_error", "Internal server error"), ("Internal server error", "api_error"), id="500"),
        pytest.param(_error("overloaded_error", "Overloaded"), ("Overloaded", "overloaded_error"), id="529-overloaded"),
        pytest.param(
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            ("Overloaded", "overloaded_error"),
            id="sse-error-event",
        ),
        pytest.param(
            _error("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
            ("prompt is too long: 210000 tokens > 200000 maximum", "context_length_exceeded"),
            id="prompt-too-long-is-context-length",
        ),
        pytest.param(
            _error("invalid_request_error", "Prompt is too long"),
            ("Prompt is too long", "context_length_exceeded"),
            id="prompt-too-long-any-case",
        ),
        pytest.param(
            {"type": "invalid_request_error", "message": "bad"}, ("bad", "invalid_request_error"), id="inner-object"
        ),
        pytest.param({"error": {"type": None, "message": None}}, ("", ""), id="null-fields"),
        pytest.param(None, ("", ""), id="no-body"),
    ],
)
def test_error_fields(body: object, expected: tuple[str, str]) -> None:
    assert am.error_fields(body) == expected
