"""Table tests of `providers.ollama_mapping`: domain → `/api/chat` keyword arguments, and SDK
response objects (built from wire JSON with the installed `ollama` models) → domain. Wire facts:
shared/reference/provider-wire-formats.md §4."""

from __future__ import annotations

import base64
import re
from types import SimpleNamespace
from typing import Any

import ollama
import pytest

from llm_gateway_server.domain import (
    Capability,
    ChatRequest,
    FinishReason,
    GenerationOptions,
    ImagePart,
    LiveModel,
    Message,
    ResponseFormat,
    Role,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
    Usage,
)
from llm_gateway_server.errors import GatewayError
from llm_gateway_server.providers import ollama_mapping as olm

PNG = b"\x89PNG\r\n\x1a\n"
PNG_B64 = base64.b64encode(PNG).decode("ascii")
HI = Message(Role.USER, (TextPart("hi"),))
WEATHER = Tool(
    "get_weather",
    "Weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


def _name(value: object) -> str:
    """An error code or reason as its UPPER_SNAKE name, whether a string or an enum."""
    return str(getattr(value, "name", value))


def _value(value: object) -> str:
    return str(getattr(value, "value", value))


def _request(
    *messages: Message, tools: tuple[Tool, ...] = (), tool_choice: ToolChoice | None = None, **generation: Any
) -> ChatRequest:
    return ChatRequest(
        model="alias",
        messages=messages or (HI,),
        tools=tools,
        tool_choice=tool_choice,
        generation=GenerationOptions(**generation),
    )


def _chat_response(message: dict[str, Any], **fields: Any) -> ollama.ChatResponse:
    """A `/api/chat` object (or NDJSON line) as the SDK parses it (reference §4.2)."""
    return ollama.ChatResponse.model_validate(
        {"model": "llama3.2", "message": {"role": "assistant", "content": "", **message}, "done": True, **fields}
    )


# --- request: messages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "wire"),
    [
        pytest.param(
            (Message(Role.SYSTEM, (TextPart("be brief"),)), HI),
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            id="system-and-user",
        ),
        pytest.param(
            (Message(Role.USER, (TextPart("a"), TextPart("b"))),),
            [{"role": "user", "content": "ab"}],
            id="text-parts-joined",
        ),
        pytest.param(
            (Message(Role.ASSISTANT, (TextPart("hello"),)),),
            [{"role": "assistant", "content": "hello"}],
            id="assistant",
        ),
        pytest.param(
            (Message(Role.USER, (TextPart("what?"), ImagePart(data=PNG, mime_type="image/png"))),),
            [{"role": "user", "content": "what?", "images": [PNG_B64]}],
            id="image-bytes-base64",
        ),
        pytest.param(
            (Message(Role.USER, (ImagePart(url=f"data:image/png;base64,{PNG_B64}"), ImagePart(data=b"x"))),),
            [{"role": "user", "content": "", "images": [PNG_B64, "eA=="]}],
            id="data-url-payload-and-bytes",
        ),
        pytest.param(
            (Message(Role.ASSISTANT, tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Tokyo"}'),)),),
            [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}],
                }
            ],
            id="tool-call-arguments-object",
        ),
        pytest.param(
            (Message(Role.ASSISTANT, tool_calls=(ToolCall("c1", "f", ""), ToolCall("c2", "g", "{oops"))),),
            [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "f", "arguments": {}}},
                        {"function": {"name": "g", "arguments": {}}},
                    ],
                }
            ],
            id="empty-and-invalid-arguments-become-empty-object",
        ),
        pytest.param(
            (
                Message(Role.ASSISTANT, tool_calls=(ToolCall("call_1", "get_weather", "{}"),)),
                Message(Role.TOOL, (TextPart("15 degrees"),), tool_call_id="call_1"),
            ),
            [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "get_weather", "arguments": {}}}],
                },
                {"role": "tool", "content": "15 degrees", "tool_name": "get_weather"},
            ],
            id="tool-result-named-after-the-call",
        ),
        pytest.param(
            (Message(Role.TOOL, (TextPart("r"),), tool_call_id="unknown", name="lookup"),),
            [{"role": "tool", "content": "r", "tool_name": "lookup"}],
            id="tool-result-unknown-call-uses-message-name",
        ),
        pytest.param(
            (Message(Role.TOOL, (TextPart("r"),), tool_call_id="unknown"),),
            [{"role": "tool", "content": "r", "tool_name": ""}],
            id="tool-result-unknown-call-no-name",
        ),
    ],
)
def test_messages_to_wire(messages: tuple[Message, ...], wire: list[dict[str, Any]]) -> None:
    assert olm.messages_to_wire(_request(*messages), "ollama") == wire


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://example.com/cat.png", id="https"),
        pytest.param("data:image/png,rawnotbase64", id="data-url-without-base64"),
        pytest.param(None, id="no-url-no-data"),
    ],
)
def test_image_url_is_not_supported(url: str | None) -> None:
    request = _request(Message(Role.USER, (ImagePart(url=url),)))
    with pytest.raises(GatewayError) as info:
        olm.chat_params(request, "llava", "local")
    err = info.value
    assert (_name(err.code), _value(err.reason)) == ("INVALID_ARGUMENT", "CAPABILITY_NOT_SUPPORTED")
    assert dict(err.metadata) == {"provider": "local", "capability": "image_url"}


# --- request: generation options -------------------------------------------------------------


def test_chat_params_unset_options_are_absent() -> None:
    assert olm.chat_params(_request(), "llama3.2", "ollama") == {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hi"}],
    }


@pytest.mark.parametrize(
    ("generation", "options"),
    [
        pytest.param({"temperature": 0.1}, {"temperature": 0.1}, id="temperature"),
        pytest.param({"temperature": 0.0}, {"temperature": 0.0}, id="temperature-zero-is-set"),
        pytest.param({"top_p": 0.9}, {"top_p": 0.9}, id="top_p"),
        pytest.param({"top_k": 40}, {"top_k": 40}, id="top_k"),
        pytest.param({"max_output_tokens": 5}, {"num_predict": 5}, id="max_output_tokens-is-num_predict"),
        pytest.param({"seed": 42}, {"seed": 42}, id="seed"),
        pytest.param({"seed": 0}, {"seed": 0}, id="seed-zero-is-set"),
        pytest.param({"presence_penalty": 0.5}, {"presence_penalty": 0.5}, id="presence_penalty"),
        pytest.param({"frequency_penalty": -0.5}, {"frequency_penalty": -0.5}, id="frequency_penalty"),
        pytest.param({"stop_sequences": ("\n",)}, {"stop": ["\n"]}, id="stop-sequence"),
        pytest.param({"stop_sequences": ("a", "b")}, {"stop": ["a", "b"]}, id="stop-sequences"),
        pytest.param(
            {
                "temperature": 0.2,
                "top_p": 0.8,
                "top_k": 10,
                "max_output_tokens": 64,
                "seed": 7,
                "presence_penalty": 0.1,
                "frequency_penalty": 0.3,
                "stop_sequences": ("X",),
            },
            {
                "temperature": 0.2,
                "top_p": 0.8,
                "top_k": 10,
                "num_predict": 64,
                "seed": 7,
                "presence_penalty": 0.1,
                "frequency_penalty": 0.3,
                "stop": ["X"],
            },
            id="all",
        ),
    ],
)
def test_chat_params_options(generation: dict[str, Any], options: dict[str, Any]) -> None:
    params = olm.chat_params(_request(**generation), "m", "ollama")
    assert params["options"] == options
    assert set(params) == {"model", "messages", "options"}


def test_options_are_valid_sdk_options() -> None:
    request = _request(
        temperature=0.2,
        top_p=0.8,
        top_k=10,
        max_output_tokens=64,
        seed=7,
        presence_penalty=0.1,
        frequency_penalty=0.3,
        stop_sequences=("X",),
    )
    options = olm.chat_params(request, "m", "ollama")["options"]
    assert set(options) <= set(ollama.Options.model_fields)
    ollama.Options.model_validate(options)


@pytest.mark.parametrize(
    ("response_format", "extras"),
    [
        pytest.param(None, {}, id="unset"),
        pytest.param(ResponseFormat("text"), {}, id="text"),
        pytest.param(ResponseFormat("json_object"), {"format": "json"}, id="json-object"),
        pytest.param(
            ResponseFormat("json_schema", schema_name="A", schema={"type": "object", "properties": {"a": {}}}),
            {"format": {"type": "object", "properties": {"a": {}}}},
            id="json-schema-is-the-format",
        ),
        pytest.param(ResponseFormat("json_schema"), {"format": {}}, id="json-schema-without-schema"),
    ],
)
def test_chat_params_response_format(response_format: ResponseFormat | None, extras: dict[str, Any]) -> None:
    params = olm.chat_params(_request(response_format=response_format), "m", "ollama")
    assert {k: v for k, v in params.items() if k not in ("model", "messages")} == extras


@pytest.mark.parametrize(
    ("tool", "wire"),
    [
        pytest.param(
            WEATHER,
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                },
            },
            id="with-schema",
        ),
        pytest.param(
            Tool("now"),
            {
                "type": "function",
                "function": {"name": "now", "description": "", "parameters": {"type": "object", "properties": {}}},
            },
            id="no-arguments-gets-empty-object-schema",
        ),
    ],
)
def test_tool_to_wire(tool: Tool, wire: dict[str, Any]) -> None:
    assert olm.chat_params(_request(tools=(tool,)), "m", "ollama")["tools"] == [wire]


@pytest.mark.parametrize(
    ("choice", "parallel"),
    [
        pytest.param(ToolChoice(mode="required"), None, id="tool-choice"),
        pytest.param(ToolChoice(function_name="get_weather"), None, id="forced-function"),
        pytest.param(None, False, id="parallel"),
    ],
)
def test_tool_choice_and_parallel_never_sent(choice: ToolChoice | None, parallel: bool | None) -> None:
    params = olm.chat_params(_request(tools=(WEATHER,), tool_choice=choice, parallel_tool_calls=parallel), "m", "o")
    assert set(params) == {"model", "messages", "tools"}


# --- request: warnings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        pytest.param(_request(), [], id="nothing-dropped"),
        pytest.param(
            _request(temperature=1.0, top_k=4, seed=1, max_output_tokens=3, stop_sequences=("x",)),
            [],
            id="options-supported",
        ),
        pytest.param(_request(tools=(WEATHER,), tool_choice=ToolChoice()), [], id="empty-choice-is-auto"),
        pytest.param(
            _request(tools=(WEATHER,), tool_choice=ToolChoice(mode="auto")), [], id="auto-is-what-ollama-does"
        ),
        pytest.param(
            _request(tools=(WEATHER,), tool_choice=ToolChoice(mode="required")), ["tool_choice"], id="required"
        ),
        pytest.param(_request(tools=(WEATHER,), tool_choice=ToolChoice(mode="none")), ["tool_choice"], id="none"),
        pytest.param(
            _request(tools=(WEATHER,), tool_choice=ToolChoice(function_name="get_weather")),
            ["tool_choice"],
            id="forced-function",
        ),
        pytest.param(_request(parallel_tool_calls=True), ["generation.parallel_tool_calls"], id="parallel-true"),
        pytest.param(
            _request(tools=(WEATHER,), parallel_tool_calls=False),
            ["generation.parallel_tool_calls"],
            id="parallel-false",
        ),
        pytest.param(
            _request(tools=(WEATHER,), tool_choice=ToolChoice(mode="required"), parallel_tool_calls=False),
            ["tool_choice", "generation.parallel_tool_calls"],
            id="both",
        ),
    ],
)
def test_chat_warnings(request_: ChatRequest, fields: list[str]) -> None:
    warnings = olm.chat_warnings(request_)
    assert [w.field for w in warnings] == fields
    assert all(str(w.code) == "OPTION_DROPPED" and w.message for w in warnings)


# --- response: finish reasons ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "saw_tool_calls", "expected"),
    [
        pytest.param("stop", False, FinishReason.STOP, id="stop"),
        pytest.param("stop", True, FinishReason.TOOL_CALLS, id="stop-after-tool-calls"),
        pytest.param("length", False, FinishReason.LENGTH, id="length"),
        pytest.param("length", True, FinishReason.LENGTH, id="length-after-tool-calls"),
        pytest.param(None, False, FinishReason.STOP, id="absent-is-stop"),
        pytest.param(None, True, FinishReason.TOOL_CALLS, id="absent-after-tool-calls"),
        pytest.param("", False, FinishReason.STOP, id="empty-is-stop"),
        pytest.param("load", False, FinishReason.OTHER, id="load"),
        pytest.param("unload", False, FinishReason.OTHER, id="unload"),
        pytest.param("something_new", True, FinishReason.OTHER, id="unknown"),
    ],
)
def test_finish_reason(raw: str | None, saw_tool_calls: bool, expected: FinishReason) -> None:
    assert olm.finish_reason(raw, saw_tool_calls) is expected


# --- response: tool calls --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool_calls", "expected"),
    [
        pytest.param(None, [], id="none"),
        pytest.param([], [], id="empty"),
        pytest.param(
            [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}],
            [("get_weather", '{"city":"Tokyo"}')],
            id="recorded-call-compact-json",
        ),
        pytest.param(
            [
                {"function": {"name": "a", "arguments": {}}},
                {"function": {"name": "b", "arguments": {"x": [1, 2], "y": {"z": None}}}},
            ],
            [("a", "{}"), ("b", '{"x":[1,2],"y":{"z":null}}')],
            id="parallel-calls",
        ),
        pytest.param(
            [{"id": "call_server", "function": {"index": 0, "name": "f", "arguments": {"q": 1}}}],
            [("f", '{"q":1}')],
            id="server-id-and-index-tolerated",
        ),
    ],
)
def test_tool_calls_from_wire(tool_calls: list[dict[str, Any]] | None, expected: list[tuple[str, str]]) -> None:
    response = _chat_response({"tool_calls": tool_calls})
    calls = olm.tool_calls_from_wire(response.message.tool_calls)
    assert [(c.name, c.arguments) for c in calls] == expected
    assert all(CALL_ID.match(c.id) for c in calls)
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        pytest.param(
            SimpleNamespace(id="call_abc", function=SimpleNamespace(name="f", arguments={"a": 1})),
            ToolCall("call_abc", "f", '{"a":1}'),
            id="id-kept-when-present",
        ),
        pytest.param(
            SimpleNamespace(id="c", function=SimpleNamespace(name="f", arguments='{"a": 1}')),
            ToolCall("c", "f", '{"a": 1}'),
            id="string-arguments-verbatim",
        ),
        pytest.param(
            SimpleNamespace(id="c", function=SimpleNamespace(name=None, arguments=None)),
            ToolCall("c", "", "{}"),
            id="null-name-and-arguments",
        ),
    ],
)
def test_tool_calls_from_wire_shapes(call: Any, expected: ToolCall) -> None:
    assert olm.tool_calls_from_wire([call]) == (expected,)


def test_new_call_id() -> None:
    ids = {olm.new_call_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(CALL_ID.match(i) for i in ids)


# --- response: usage -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param(
            {
                "done_reason": "stop",
                "total_duration": 182242375,
                "load_duration": 41295167,
                "prompt_eval_count": 169,
                "prompt_eval_duration": 24573166,
                "eval_count": 15,
                "eval_duration": 115959084,
            },
            Usage(input_tokens=169, output_tokens=15),
            id="recorded-final-line",
        ),
        pytest.param({"prompt_eval_count": 26, "eval_count": 298}, Usage(26, 298), id="non-stream"),
        pytest.param({"eval_count": 15}, Usage(0, 15), id="prompt-count-omitted-when-zero"),
        pytest.param({"prompt_eval_count": 26}, Usage(26, 0), id="eval-count-omitted-when-zero"),
        pytest.param({"done_reason": "stop"}, None, id="no-counts"),
    ],
)
def test_usage_from_wire(fields: dict[str, Any], expected: Usage | None) -> None:
    result = olm.usage_from_wire(_chat_response({"content": "x"}, **fields))
    assert result == expected
    if result is not None:
        assert not result.estimated


# --- models ----------------------------------------------------------------------------------

_CHAT = {Capability.CHAT, Capability.STREAMING, Capability.JSON_MODE}


@pytest.mark.parametrize(
    ("shown", "expected"),
    [
        pytest.param(
            {
                "modelfile": "# Modelfile generated by ...",
                "details": {"format": "gguf", "family": "llama", "parameter_size": "8.0B"},
                "model_info": {
                    "general.architecture": "llama",
                    "general.parameter_count": 8030261248,
                    "llama.context_length": 8192,
                    "llama.embedding_length": 4096,
                },
                "capabilities": ["completion", "vision"],
            },
            LiveModel("m", capabilities=frozenset({*_CHAT, Capability.VISION}), context_window=8192),
            id="recorded-show-vision",
        ),
        pytest.param(
            {
                "model_info": {"general.architecture": "qwen3", "qwen3.context_length": 40960},
                "capabilities": ["completion", "tools", "thinking", "insert"],
            },
            LiveModel("m", capabilities=frozenset({*_CHAT, Capability.TOOLS}), context_window=40960),
            id="tools-unmapped-capabilities-ignored",
        ),
        pytest.param(
            {"model_info": {"general.architecture": "bert", "bert.context_length": 512}, "capabilities": ["embedding"]},
            LiveModel("m", capabilities=frozenset({Capability.EMBEDDINGS}), context_window=512),
            id="embedding-model",
        ),
        pytest.param(
            {"model_info": {"general.architecture": "llama"}, "capabilities": ["completion"]},
            LiveModel("m", capabilities=frozenset(_CHAT)),
            id="no-context-length",
        ),
        pytest.param({"model_info": {}}, LiveModel("m"), id="empty-model-info-no-capabilities"),
        pytest.param({"model_info": None, "capabilities": []}, LiveModel("m"), id="null-model-info"),
    ],
)
def test_live_model(shown: dict[str, Any], expected: LiveModel) -> None:
    assert olm.live_model("m", ollama.ShowResponse.model_validate(shown)) == expected
