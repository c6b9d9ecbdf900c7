"""Pure transforms between domain types and Ollama's native API (`/api/chat`, `/api/embed`).

Wire facts: shared/reference/provider-wire-formats.md §4 (ollama SDK 0.6.3): options go in
`options` (`num_predict` is the output limit), tool-call arguments are JSON objects (not text),
tool results are matched by `tool_name`, images are base64 strings on the message, streams are
NDJSON whose last line has `done: true` and `done_reason`.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from typing import Any

from ..domain import (
    Capability,
    ChatRequest,
    FinishReason,
    ImagePart,
    LiveModel,
    OptionWarning,
    Role,
    TextPart,
    ToolCall,
    Usage,
)
from ..errors import capability_not_supported

# Ollama `done_reason` → normalised reason (tool calls detected separately). Source: reference §4.2.
DONE_REASONS: Mapping[str, FinishReason] = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


def finish_reason(raw: str | None, saw_tool_calls: bool) -> FinishReason:
    """Normalises `done_reason`; a stop after tool calls is TOOL_CALLS (as Ollama's /v1 does)."""
    reason = DONE_REASONS.get(raw or "stop", FinishReason.OTHER)
    if reason is FinishReason.STOP and saw_tool_calls:
        return FinishReason.TOOL_CALLS
    return reason


def _image_b64(part: ImagePart, provider: str) -> str:
    if part.data is not None:
        return base64.b64encode(part.data).decode("ascii")
    url = part.url or ""
    if url.startswith("data:") and ";base64," in url:
        return url.split(";base64,", 1)[1]
    raise capability_not_supported(
        "",
        "image_url",
        provider=provider,
        detail=f"provider {provider!r} (Ollama) does not fetch image URLs; send the image bytes (ImagePart.data) "
        "or a data: URL instead",
    )


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return {}


def messages_to_wire(request: ChatRequest, provider: str) -> list[dict[str, Any]]:
    """Domain messages → `/api/chat` messages (tool results carry the called function's name)."""
    names_by_call_id: dict[str, str] = {}
    wire: list[dict[str, Any]] = []
    for message in request.messages:
        entry: dict[str, Any] = {
            "role": message.role.value,
            "content": "".join(p.text for p in message.content if isinstance(p, TextPart)),
        }
        images = [_image_b64(p, provider) for p in message.content if isinstance(p, ImagePart)]
        if images:
            entry["images"] = images
        if message.tool_calls:
            entry["tool_calls"] = [
                {"function": {"name": c.name, "arguments": _arguments_object(c.arguments)}} for c in message.tool_calls
            ]
            names_by_call_id.update({c.id: c.name for c in message.tool_calls})
        if message.role is Role.TOOL:
            entry["tool_name"] = names_by_call_id.get(message.tool_call_id, message.name)
        wire.append(entry)
    return wire


def chat_warnings(request: ChatRequest) -> tuple[OptionWarning, ...]:
    """Warnings for the options `chat_params` drops (Ollama has no tool_choice or parallel switch)."""
    warnings: list[OptionWarning] = []
    choice = request.tool_choice
    if choice is not None and (choice.function_name or choice.mode in ("required", "none")):
        warnings.append(
            OptionWarning("OPTION_DROPPED", "tool_choice", "Ollama's /api/chat has no tool_choice; the model decides")
        )
    if request.generation.parallel_tool_calls is not None:
        warnings.append(
            OptionWarning(
                "OPTION_DROPPED", "generation.parallel_tool_calls", "Ollama has no parallel_tool_calls switch"
            )
        )
    return tuple(warnings)


def chat_params(request: ChatRequest, model: str, provider: str) -> dict[str, Any]:
    """Keyword arguments of `AsyncClient.chat` (without `stream`).

    Raises:
        GatewayError: CAPABILITY_NOT_SUPPORTED for an image URL (Ollama takes bytes only).
    """
    gen = request.generation
    options: dict[str, Any] = {}
    for key, value in (
        ("temperature", gen.temperature),
        ("top_p", gen.top_p),
        ("top_k", gen.top_k),
        ("num_predict", gen.max_output_tokens),
        ("seed", gen.seed),
        ("presence_penalty", gen.presence_penalty),
        ("frequency_penalty", gen.frequency_penalty),
    ):
        if value is not None:
            options[key] = value
    if gen.stop_sequences:
        options["stop"] = list(gen.stop_sequences)
    params: dict[str, Any] = {"model": model, "messages": messages_to_wire(request, provider)}
    if options:
        params["options"] = options
    fmt = gen.response_format
    if fmt is not None and fmt.type == "json_object":
        params["format"] = "json"
    elif fmt is not None and fmt.type == "json_schema":
        params["format"] = dict(fmt.schema or {})
    if request.tools:
        params["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": dict(t.parameters or {"type": "object", "properties": {}}),
                },
            }
            for t in request.tools
        ]
    return params


def new_call_id() -> str:
    """A tool-call id for providers that give none (Ollama may omit them)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls_from_wire(calls: Any) -> tuple[ToolCall, ...]:
    """`message.tool_calls` → ToolCall tuple; arguments objects become compact JSON text."""
    result: list[ToolCall] = []
    for call in calls or ():
        function = call.function
        arguments = function.arguments
        text = arguments if isinstance(arguments, str) else json.dumps(dict(arguments or {}), separators=(",", ":"))
        result.append(ToolCall(id=getattr(call, "id", None) or new_call_id(), name=function.name or "", arguments=text))
    return tuple(result)


# `/api/show` capabilities → gateway capabilities. Source: ollama types/model/capability.go.
_CAPABILITIES: Mapping[str, tuple[Capability, ...]] = {
    "completion": (Capability.CHAT, Capability.STREAMING, Capability.JSON_MODE),
    "tools": (Capability.TOOLS,),
    "vision": (Capability.VISION,),
    "embedding": (Capability.EMBEDDINGS,),
}


def live_model(name: str, shown: Any) -> LiveModel:
    """A `/api/show` answer → LiveModel (context length from `<architecture>.context_length`)."""
    info = dict(getattr(shown, "modelinfo", None) or {})
    architecture = info.get("general.architecture", "")
    context = info.get(f"{architecture}.context_length", 0) if architecture else 0
    capabilities = frozenset(
        c for raw in (getattr(shown, "capabilities", None) or ()) for c in _CAPABILITIES.get(raw, ())
    )
    return LiveModel(name, capabilities=capabilities or None, context_window=int(context or 0))


def usage_from_wire(response: Any) -> Usage | None:
    """`prompt_eval_count` / `eval_count` of the final object → Usage (None when both absent)."""
    prompt = getattr(response, "prompt_eval_count", None)
    completion = getattr(response, "eval_count", None)
    if prompt is None and completion is None:
        return None
    return Usage(input_tokens=int(prompt or 0), output_tokens=int(completion or 0))
