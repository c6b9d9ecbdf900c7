"""Pure transforms between domain types and the OpenAI Chat Completions / Embeddings wire format.

Wire facts: shared/reference/provider-wire-formats.md §1 (openai SDK 3.54, `POST /chat/completions`,
SSE chunks, `POST /embeddings`). No I/O here: the adapter is a thin shell around these.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from ..domain import (
    ChatDelta,
    ChatRequest,
    FinishReason,
    ImagePart,
    Message,
    OptionWarning,
    ProviderChatResult,
    Role,
    TextPart,
    ToolCall,
    ToolCallDelta,
    Usage,
)

# OpenAI `finish_reason` → normalised reason. Source: reference §1.3.
FINISH_REASONS: Mapping[str, FinishReason] = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
}


def finish_reason(raw: str | None) -> FinishReason:
    """Normalises an OpenAI finish reason; unknown non-empty values map to OTHER."""
    return FINISH_REASONS.get(raw or "", FinishReason.OTHER)


def _image_url(part: ImagePart) -> dict[str, Any]:
    if part.data is not None:
        url = f"data:{part.mime_type};base64,{base64.b64encode(part.data).decode('ascii')}"
    else:
        url = part.url or ""
    image: dict[str, Any] = {"url": url}
    if part.detail:
        image["detail"] = part.detail
    return {"type": "image_url", "image_url": image}


def _content(message: Message) -> str | list[dict[str, Any]]:
    if all(isinstance(p, TextPart) for p in message.content):
        return message.text
    parts: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, TextPart):
            parts.append({"type": "text", "text": part.text})
        else:
            parts.append(_image_url(part))
    return parts


def message_to_wire(message: Message) -> dict[str, Any]:
    """One domain message → one `messages[]` entry."""
    wire: dict[str, Any] = {"role": message.role.value}
    if message.role is Role.ASSISTANT:
        wire["content"] = message.text if message.content else None
        if message.tool_calls:
            wire["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in message.tool_calls
            ]
    elif message.role is Role.TOOL:
        wire["content"] = message.text
        wire["tool_call_id"] = message.tool_call_id
    else:
        wire["content"] = _content(message)
    if message.name and message.role is not Role.TOOL:
        wire["name"] = message.name
    return wire


def chat_warnings(request: ChatRequest) -> tuple[OptionWarning, ...]:
    """Warnings for options the Chat Completions API has no field for (dropped by `chat_params`,
    never reinterpreted)."""
    gen = request.generation
    warnings: list[OptionWarning] = []
    if gen.top_k is not None:
        warnings.append(
            OptionWarning("OPTION_DROPPED", "generation.top_k", "the OpenAI Chat Completions API has no top_k")
        )
    if gen.parallel_tool_calls is not None and not request.tools:
        warnings.append(OptionWarning("OPTION_DROPPED", "generation.parallel_tool_calls", "no tools in the request"))
    return tuple(warnings)


def chat_params(request: ChatRequest, model: str, *, stream: bool) -> dict[str, Any]:
    """The Chat Completions request body (see `chat_warnings` for what it leaves out)."""
    gen = request.generation
    params: dict[str, Any] = {
        "model": model,
        "messages": [message_to_wire(m) for m in request.messages],
    }
    if stream:
        params["stream"] = True
        params["stream_options"] = {"include_usage": True}
    if gen.temperature is not None:
        params["temperature"] = gen.temperature
    if gen.top_p is not None:
        params["top_p"] = gen.top_p
    if gen.max_output_tokens is not None:
        params["max_tokens"] = gen.max_output_tokens
    if gen.stop_sequences:
        params["stop"] = list(gen.stop_sequences)
    if gen.seed is not None:
        params["seed"] = gen.seed
    if gen.presence_penalty is not None:
        params["presence_penalty"] = gen.presence_penalty
    if gen.frequency_penalty is not None:
        params["frequency_penalty"] = gen.frequency_penalty
    fmt = gen.response_format
    if fmt is not None and fmt.type == "json_object":
        params["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        schema: dict[str, Any] = {"name": fmt.schema_name or "response", "schema": dict(fmt.schema or {})}
        if fmt.schema_description:
            schema["description"] = fmt.schema_description
        if fmt.strict:
            schema["strict"] = True
        params["response_format"] = {"type": "json_schema", "json_schema": schema}
    if request.tools:
        params["tools"] = [_tool_to_wire(t.name, t.description, t.parameters, t.strict) for t in request.tools]
        if gen.parallel_tool_calls is not None:
            params["parallel_tool_calls"] = gen.parallel_tool_calls
    choice = request.tool_choice
    if choice is not None and request.tools:
        if choice.function_name:
            params["tool_choice"] = {"type": "function", "function": {"name": choice.function_name}}
        elif choice.mode:
            params["tool_choice"] = choice.mode
    if request.end_user_id:
        params["user"] = request.end_user_id
    return params


def _tool_to_wire(name: str, description: str, parameters: Mapping[str, Any] | None, strict: bool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "parameters": dict(parameters or {"type": "object", "properties": {}})}
    if description:
        function["description"] = description
    if strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def usage_from_wire(usage: Any) -> Usage | None:
    """The `usage` object (JSON) of a completion or of the last stream chunk → Usage (None when
    absent)."""
    if not isinstance(usage, Mapping):
        return None
    prompt_details = _mapping(usage.get("prompt_tokens_details"))
    return Usage(
        input_tokens=int(usage.get("prompt_tokens") or 0),
        output_tokens=int(usage.get("completion_tokens") or 0),
        cached_input_tokens=int(prompt_details.get("cached_tokens") or 0),
        cache_creation_input_tokens=int(prompt_details.get("cache_write_tokens") or 0),
        reasoning_tokens=int(_mapping(usage.get("completion_tokens_details")).get("reasoning_tokens") or 0),
    )


def tool_calls_from_wire(calls: Any) -> tuple[ToolCall, ...]:
    """`message.tool_calls` (JSON) → ToolCall tuple (arguments text passed through)."""
    result: list[ToolCall] = []
    for call in calls or ():
        function = _mapping(_mapping(call).get("function"))
        if not function:
            continue
        result.append(
            ToolCall(
                id=call.get("id") or "", name=function.get("name") or "", arguments=function.get("arguments") or ""
            )
        )
    return tuple(result)


def completion_from_wire(data: Any, model: str) -> ProviderChatResult:
    """A `chat.completion` JSON body → ProviderChatResult.

    Raises:
        ValueError: the body is not a completion with at least one choice.
    """
    choices = _mapping(data).get("choices")
    if not choices:
        raise ValueError("the completion has no choices")
    choice = _mapping(choices[0])
    message = _mapping(choice.get("message"))
    raw_reason = choice.get("finish_reason") or ""
    return ProviderChatResult(
        model=data.get("model") or model,
        text=message.get("content") or "",
        tool_calls=tool_calls_from_wire(message.get("tool_calls")),
        finish_reason=finish_reason(raw_reason),
        provider_finish_reason=raw_reason,
        usage=usage_from_wire(data.get("usage")),
        response_id=data.get("id") or "",
    )


def delta_from_chunk(choice: Mapping[str, Any]) -> ChatDelta | None:
    """One streamed `choices[0]` (JSON) → ChatDelta, or None when it carries no content."""
    delta = choice.get("delta")
    if not delta:
        return None
    text = delta.get("content") or ""
    calls = delta.get("tool_calls")
    fragments: tuple[ToolCallDelta, ...] = ()
    if calls:
        fragments = tuple(
            ToolCallDelta(
                index=int(tc.get("index") or 0),
                id=tc.get("id") or "",
                name=_mapping(tc.get("function")).get("name") or "",
                arguments=_mapping(tc.get("function")).get("arguments") or "",
            )
            for tc in calls
        )
    if not text and not fragments:
        return None
    return ChatDelta(text=text, tool_calls=fragments)


def error_fields(body: object) -> tuple[str, str]:
    """(message, code-or-type) from an OpenAI error body (`{"message","type","code"}`, which the
    SDK stores as `e.body`), tolerating bodies of other shapes."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            message = inner.get("message")
            code = inner.get("code") or inner.get("type") or ""
            return (message if isinstance(message, str) else json.dumps(inner)[:500]), str(code)
        if isinstance(inner, str):
            return inner, ""
    if isinstance(body, str):
        return body, ""
    return "", ""
