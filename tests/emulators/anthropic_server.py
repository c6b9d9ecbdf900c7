"""A loopback emulator of the Anthropic HTTP API (Messages, count_tokens, Models).

Wire format per shared/reference/provider-wire-formats.md §3: JSON bodies, SSE where every event has
an `event: <type>` line (no `[DONE]`), errors as `{"type": "error", "error": {"type", "message"},
"request_id"}` with a `request-id` header. Served on `/v1/...` only (the SDK's base_url has no `/v1`).
Both `x-api-key` and `Authorization: Bearer` are accepted (recorded, never checked).

Behaviour is chosen by the requested model name, so one emulator serves every scenario:

| model            | behaviour                                                                    |
|------------------|------------------------------------------------------------------------------|
| anything else    | answers "echo: <last user text>", stop_reason `end_turn`; streamed in 3 deltas |
| `tools`          | a `get_weather` `tool_use` block with input `{"city": "Paris"}`, stop_reason    |
|                  | `tool_use` (streamed as 3 `input_json_delta` fragments); a forced             |
|                  | `tool_choice` `{"type": "tool", "name": X}` renames it to X, and X =          |
|                  | `json_response` answers input `{"answer": "echo"}`                            |
| `length`         | stop_reason `max_tokens`                                                     |
| `stop-seq`       | stop_reason `stop_sequence`, `stop_sequence: "END"`                          |
| `refusal`        | stop_reason `refusal`, one empty text block (streamed without deltas)        |
| `status-<N>`     | HTTP N with an Anthropic error body (429 adds `retry-after: 2`)               |
| `context-length` | 400 `invalid_request_error` "prompt is too long: 250000 tokens > 200000 ..." |
| `missing-model`  | 404 `not_found_error` "model: missing-model"                                 |
| `malformed`      | 200 with a body that is not JSON                                             |
| `hang`           | never answers (records `"messages"` in `disconnects` when the client leaves) |
| `stream-error`   | (stream) message_start ... one text delta, then `event: error` (overloaded)   |
| `drop-stream`    | (stream) one text delta, then closes the connection abruptly                 |
| `truncated`      | (stream) one text delta, then ends the response without message_delta/stop   |

Error types per status: 400 invalid_request_error, 401 authentication_error, 402 billing_error,
403 permission_error, 404 not_found_error, 409 conflict_error, 413 request_too_large,
429 rate_limit_error, 500 api_error, 504 timeout_error, 529 overloaded_error, any other api_error.

Usage is always `{"input_tokens": 11, "output_tokens": 7, "cache_read_input_tokens": 2,
"cache_creation_input_tokens": 3}` (streams: `output_tokens: 1` in message_start, 7 in message_delta).

`POST /v1/messages/count_tokens` answers `{"input_tokens": 3 + chars // 4}`, where `chars` is the
total length of all text in `system` and in every message's `content` (each a string, or a list
of blocks whose `type: "text"` blocks count by the length of `text`; other blocks count 0). The
`status-<N>`, `context-length` and `missing-model` scenarios apply there too.

`GET /v1/models` pages over `models` with `limit` (default 20), `after_id` and `before_id`;
`GET /v1/models/{id}` answers one ModelInfo or 404 `not_found_error`.

Every request is recorded (`requests`: method, path, headers, JSON body).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .base import LoopbackEmulator

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_DISPLAY_NAMES = {
    "claude-haiku-4-5-20251001": "Claude Haiku 4.5",
    "claude-sonnet-4-5-20250929": "Claude Sonnet 4.5",
    "claude-emulated-1": "Claude Emulated 1",
}

_USAGE = {"input_tokens": 11, "output_tokens": 7, "cache_read_input_tokens": 2, "cache_creation_input_tokens": 3}

_HEADERS = {"request-id": "req_emulated"}


@dataclass
class AnthropicEmulator(LoopbackEmulator):
    """Start with `await emulator.start()`; `base_url` then points at it (no `/v1`, the SDK adds it)."""

    models: tuple[str, ...] = ("claude-haiku-4-5-20251001", "claude-sonnet-4-5-20250929", "claude-emulated-1")

    @property
    def base_url(self) -> str:
        """Server root without `/v1`, as `ANTHROPIC_BASE_URL` expects."""
        return f"http://127.0.0.1:{self.port}"

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        body = {
            "type": "error",
            "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message},
            "request_id": "req_emulated",
        }
        return web.json_response(body, status=status, headers={**_HEADERS, **(headers or {})})

    def _scenario_error(self, model: str) -> web.Response | None:
        if model.startswith("status-"):
            status = int(model.removeprefix("status-"))
            headers = {"retry-after": "2"} if status == 429 else {}
            return self._error(status, f"emulated failure with status {status}", headers)
        if model == "context-length":
            return self._error(400, "prompt is too long: 250000 tokens > 200000 maximum")
        if model == "missing-model":
            return self._error(404, f"model: {model}")
        return None

    async def _hang(self, request: web.Request, label: str) -> web.StreamResponse:
        self.hang_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.disconnects.append(label)
            raise
        return web.Response(status=500)

    @staticmethod
    def _text_of(content: Any) -> str:
        if isinstance(content, str):
            return content
        return " ".join(b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text")

    @classmethod
    def _last_user_text(cls, body: dict[str, Any]) -> str:
        for message in reversed(body.get("messages", [])):
            if message.get("role") == "user":
                return cls._text_of(message.get("content"))
        return ""

    @staticmethod
    def _chars(content: Any) -> int:
        if isinstance(content, str):
            return len(content)
        return sum(len(b.get("text", "")) for b in content or [] if isinstance(b, dict) and b.get("type") == "text")

    @staticmethod
    def _tool_use(body: dict[str, Any]) -> dict[str, Any]:
        name, tool_input = "get_weather", {"city": "Paris"}
        choice = body.get("tool_choice") or {}
        if choice.get("type") == "tool" and choice.get("name"):
            name = choice["name"]
            if name == "json_response":
                tool_input = {"answer": "echo"}
        return {"type": "tool_use", "id": "toolu_emul_1", "name": name, "input": tool_input}

    @staticmethod
    def _model_info(model: str) -> dict[str, Any]:
        return {
            "type": "model",
            "id": model,
            "display_name": _DISPLAY_NAMES.get(model, model),
            "created_at": "2025-09-29T00:00:00Z",
            "lifecycle": "active",
            "max_input_tokens": 200000,
            "max_tokens": 64000,
        }

    # --- routes ------------------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        model = body.get("model", "")
        error = self._scenario_error(model)
        if error is not None:
            return error
        if model == "hang":
            return await self._hang(request, "messages")
        if model == "malformed":
            return web.Response(text="{not json", content_type="application/json", headers=_HEADERS)
        text = "" if model == "refusal" else f"echo: {self._last_user_text(body)}"
        stop_reason = {
            "tools": "tool_use",
            "length": "max_tokens",
            "stop-seq": "stop_sequence",
            "refusal": "refusal",
        }.get(model, "end_turn")
        stop_sequence = "END" if model == "stop-seq" else None
        tool_use = self._tool_use(body) if model == "tools" else None
        if body.get("stream"):
            return await self._stream(request, model, text, stop_reason, stop_sequence, tool_use)
        content = [tool_use] if tool_use is not None else [{"type": "text", "text": text}]
        message = {
            "id": "msg_emulated",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": _USAGE,
        }
        return web.json_response(message, headers=_HEADERS)

    async def _stream(
        self,
        request: web.Request,
        model: str,
        text: str,
        stop_reason: str,
        stop_sequence: str | None,
        tool_use: dict[str, Any] | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **_HEADERS})
        await response.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n".encode())

        start = {
            "id": "msg_emulated",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**_USAGE, "output_tokens": 1},
        }
        await send("message_start", {"message": start})
        await send("ping", {})
        if tool_use is not None:
            await send("content_block_start", {"index": 0, "content_block": {**tool_use, "input": {}}})
            arguments = json.dumps(tool_use["input"], separators=(",", ":"))
            third = len(arguments) // 3
            for piece in (arguments[:third], arguments[third : 2 * third], arguments[2 * third :]):
                delta = {"type": "input_json_delta", "partial_json": piece}
                await send("content_block_delta", {"index": 0, "delta": delta})
        else:
            await send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
            third = len(text) // 3
            pieces = [text[:third], text[third : 2 * third], text[2 * third :]] if text else []
            for i, piece in enumerate(pieces):
                await send("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
                if i > 0:
                    continue
                if model == "stream-error":
                    await send("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})
                    return response
                if model == "drop-stream":
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if model == "truncated":
                    return response
        await send("content_block_stop", {"index": 0})
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        await send("message_delta", {"delta": delta, "usage": {"output_tokens": _USAGE["output_tokens"]}})
        await send("message_stop", {})
        return response

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        model = body.get("model", "")
        error = self._scenario_error(model)
        if error is not None:
            return error
        if model == "hang":
            return await self._hang(request, "count_tokens")
        chars = self._chars(body.get("system")) + sum(self._chars(m.get("content")) for m in body.get("messages", []))
        return web.json_response({"input_tokens": 3 + chars // 4}, headers=_HEADERS)

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        models = list(self.models)
        limit = int(request.query.get("limit", "20"))
        after_id, before_id = request.query.get("after_id"), request.query.get("before_id")
        if before_id in models:
            end = models.index(before_id)
            start = max(0, end - limit)
            has_more = start > 0
        else:
            start = models.index(after_id) + 1 if after_id in models else 0
            end = start + limit
            has_more = end < len(models)
        page = models[start:end]
        return web.json_response(
            {
                "data": [self._model_info(m) for m in page],
                "has_more": has_more,
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
            },
            headers=_HEADERS,
        )

    async def _model(self, request: web.Request) -> web.Response:
        await self._record(request)
        model = request.match_info["model"]
        if model not in self.models:
            return self._error(404, f"model: {model}")
        return web.json_response(self._model_info(model), headers=_HEADERS)
