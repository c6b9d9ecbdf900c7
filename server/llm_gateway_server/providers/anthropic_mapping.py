"""Pure transforms between domain types and Anthropic's Messages API (anthropic SDK 2.x).

Wire facts: shared/reference/provider-wire-formats.md §3 and the installed SDK. Differences the
gateway bridges: system messages become the top-level `system`; tool results are `tool_result`
blocks in a user turn; tool calls are `tool_use` blocks whose `input` is a JSON object;
`max_tokens` is required; API version 2026-10-21 (SDK 2.x) removed temperature, top_p and top_k, so
those are dropped with a warning; JSON output uses `output_config.format` (structured outputs).
Usage: Anthropic's `input_tokens` excludes cache reads and writes, the gateway's includes them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from ..domain import (
    ChatRequest,
    FinishReason,
    ImagePart,
    Message,
    OptionWarning,
    ProviderChatResult,
    Role,
    TextPart,
    ToolCall,
    Usage,
)

# Used when neither the request nor the catalog gives an output limit (Anthropic requires one).
DEFAULT_MAX_TOKENS = 4096

# Anthropic `stop_reason` → normalised reason. Source: anthropic/types/stop_reason.py (SDK 2.12).
STOP_REASONS: Mapping[str, FinishReason] = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
    "pause_turn": FinishReason.OTHER,
}

_DROPPED = (
    ("temperature", "generation.temperature"),
    ("top_p", "generation.top_p"),
    ("top_k", "generation.top_k"),
    ("seed", "generation.seed"),
    ("presence_penalty", "generation.presence_penalty"),
    ("frequency_penalty", "generation.frequency_penalty"),
)


def finish_reason(raw: str | None) -> FinishReason:
    """Normalises an Anthropic stop reason; unknown values map to OTHER."""
    return STOP_REASONS.get(raw or "", FinishReason.OTHER)


def _image_block(part: ImagePart) -> dict[str, Any]:
    if part.data is not None:
        source: dict[str, Any] = {
            "type": "base64",
            "media_type": part.mime_type,
            "data": base64.b64encode(part.data).decode("ascii"),
        }
    elif (part.url or "").startswith("data:") and ";base64," in (part.url or ""):
        header, data = (part.url or "").split(";base64,", 1)
        source = {"type": "base64", "media_type": header.removeprefix("data:"), "data": data}
    else:
        source = {"type": "url", "url": part.url}
    return {"type": "image", "source": source}


def _arguments(call: ToolCall) -> Any:
    try:
        value = json.loads(call.arguments) if call.arguments else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _blocks(message: Message) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, TextPart):
            if part.text:
                blocks.append({"type": "text", "text": part.text})
        else:
            blocks.append(_image_block(part))
    for call in message.tool_calls:
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": _arguments(call)})
    return blocks


def messages_to_wire(messages: tuple[Message, ...]) -> tuple[str, list[dict[str, Any]]]:
    """(system prompt, messages): system messages are joined into the top-level system prompt;
    consecutive tool results are merged into one user turn of `tool_result` blocks."""
    system = "\n\n".join(m.text for m in messages if m.role is Role.SYSTEM)
    wire: list[dict[str, Any]] = []
    previous_was_tool = False
    for message in messages:
        if message.role is Role.SYSTEM:
            continue
        if message.role is Role.TOOL:
            block = {"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.text}
            if previous_was_tool:
                wire[-1]["content"].append(block)
            else:
                wire.append({"role": "user", "content": [block]})
            previous_was_tool = True
            continue
        wire.append({"role": message.role.value, "content": _blocks(message)})
        previous_was_tool = False
    return system, wire


def chat_warnings(request: ChatRequest) -> tuple[OptionWarning, ...]:
    """Warnings for the sampling options `chat_params` drops."""
    return tuple(
        OptionWarning(
            "OPTION_DROPPED", field, "Anthropic's Messages API (version 2026-10-21, SDK 2.x) has no such parameter"
        )
        for attribute, field in _DROPPED
        if getattr(request.generation, attribute) is not None
    )


def chat_params(request: ChatRequest, model: str) -> dict[str, Any]:
    """The Messages request body, without `stream` (see `chat_warnings` for what it drops)."""
    gen = request.generation
    system, messages = messages_to_wire(request.messages)
    params: dict[str, Any] = {
        "model": model,
        "max_tokens": gen.max_output_tokens or DEFAULT_MAX_TOKENS,
        "messages": messages,
    }
    if system:
        params["system"] = system
    if gen.stop_sequences:
        params["stop_sequences"] = list(gen.stop_sequences)
    fmt = gen.response_format
    if fmt is not None and fmt.type == "json_object":
        params["output_config"] = {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    elif fmt is not None and fmt.type == "json_schema":
        params["output_config"] = {"format": {"type": "json_schema", "schema": dict(fmt.schema or {})}}
    if request.tools:
        params["tools"] = [
            {
                "name": t.name,
                "description": t.description,
                "input_schema": dict(t.parameters or {"type": "object", "properties": {}}),
                **({"strict": True} if t.strict else {}),
            }
            for t in request.tools
        ]
        choice: dict[str, Any] = {"type": "auto"}
        if request.tool_choice is not None and request.tool_choice.function_name:
            choice = {"type": "tool", "name": request.tool_choice.function_name}
        elif request.tool_choice is not None and request.tool_choice.mode == "required":
            choice = {"type": "any"}
        elif request.tool_choice is not None and request.tool_choice.mode == "none":
            choice = {"type": "none"}
        if gen.parallel_tool_calls is False and choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
        params["tool_choice"] = choice
    if request.end_user_id:
        params["metadata"] = {"user_id": request.end_user_id}
    return params


def _count(usage: Mapping[str, Any], field: str) -> int:
    value = usage.get(field)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def usage_from_wire(usage: object, output_tokens: int | None = None) -> Usage:
    """Anthropic `usage` JSON (`input_tokens`, `output_tokens`, `cache_read_input_tokens`,
    `cache_creation_input_tokens`; absent or null fields are 0) → Usage, whose input includes
    cache reads and writes. `output_tokens`: the stream's `message_delta` count, which wins."""
    fields: Mapping[str, Any] = usage if isinstance(usage, Mapping) else {}
    cache_read = _count(fields, "cache_read_input_tokens")
    cache_write = _count(fields, "cache_creation_input_tokens")
    uncached = _count(fields, "input_tokens")
    output = output_tokens if output_tokens is not None else _count(fields, "output_tokens")
    return Usage(
        input_tokens=uncached + cache_read + cache_write,
        output_tokens=output,
        cached_input_tokens=cache_read,
        cache_creation_input_tokens=cache_write,
    )


def content_from_wire(blocks: object) -> tuple[str, tuple[ToolCall, ...]]:
    """Response `content` blocks (JSON) → (text, tool calls); other block kinds (thinking,
    redacted thinking) are skipped.

    Raises:
        TypeError / KeyError: a text or tool_use block without its fields (a bad response).
    """
    text: list[str] = []
    calls: list[ToolCall] = []
    for block in blocks if isinstance(blocks, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text.append(str(block["text"]))
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input") or {}, separators=(",", ":"))
            calls.append(ToolCall(str(block["id"]), str(block["name"]), arguments))
    return "".join(text), tuple(calls)


def message_from_wire(data: object, model: str) -> ProviderChatResult:
    """A non-streamed Messages answer (JSON) → ProviderChatResult; `model` when it names none.

    Raises:
        TypeError / KeyError: not a message object (a bad response).
    """
    if not isinstance(data, dict):
        raise TypeError("the answer is not a JSON object")
    stop_reason = data.get("stop_reason")
    text, calls = content_from_wire(data.get("content"))
    return ProviderChatResult(
        model=str(data.get("model") or model),
        text=text,
        tool_calls=calls,
        finish_reason=finish_reason(stop_reason),
        provider_finish_reason=str(stop_reason or ""),
        usage=usage_from_wire(data.get("usage")),
        response_id=str(data.get("id") or ""),
    )


def error_fields(body: object) -> tuple[str, str]:
    """(message, error type) from `{"type":"error","error":{"type","message"}}`; a "prompt is too
    long" rejection is reported as `context_length_exceeded` so the shared table classifies it."""
    message, code = "", ""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            message = str(inner.get("message") or "")
            code = str(inner.get("type") or "")
    if "prompt is too long" in message.lower():
        code = "context_length_exceeded"
    return message, code
