"""A loopback emulator of the OpenAI HTTP API (Chat Completions, Embeddings, Models).

Wire format per shared/reference/provider-wire-formats.md §1: JSON bodies, `data:`-only SSE
ending with `data: [DONE]`, errors as `{"error": {"message", "type", "param", "code"}}`, retry
headers. Served on both `/v1/...` and `/...` paths.

Behaviour is chosen by the requested model name, so one emulator serves every scenario:

| model            | behaviour                                                                |
|------------------|--------------------------------------------------------------------------|
| anything else    | answers "echo: <last user text>"; streams it in 3 chunks + usage chunk  |
| `tools`          | answers with a `get_weather` tool call (streamed as 3 argument fragments)|
| `no-usage`       | answers without usage (and no usage chunk when streaming)                |
| `status-<N>`     | HTTP N with an OpenAI error body (429 adds `retry-after-ms: 1500`)       |
| `context-length` | 400 with code `context_length_exceeded`                                  |
| `content-filter` | 400 with code `content_policy_violation`                                 |
| `quota`          | 429 with code `insufficient_quota`                                       |
| `missing-model`  | 404 with code `model_not_found`                                          |
| `malformed`      | 200 with a body that is not JSON                                         |
| `hang`           | never answers (records when the client disconnects)                     |
| `stall-stream`   | streams one chunk, then never sends more                                 |
| `drop-stream`    | streams one chunk, then closes the connection without [DONE]            |
| `truncated`      | streams one chunk and [DONE] with no finish reason                      |
| `stream-error`   | streams one chunk, then `data: {"error": {...}}`                         |
| `length`         | finish_reason `length`                                                   |
| `slow-<ms>`      | waits <ms> milliseconds, then answers normally                            |
| `paced-<ms>`     | streams like the default, waiting <ms> milliseconds after every chunk    |
| `flaky-<N>-<K>`  | the first K calls with this model fail with HTTP N (429 adds             |
|                  | `retry-after-ms: 30`), later calls answer normally                       |
| `drop`           | closes the connection without answering (unary and streaming)           |

Every request is recorded (`requests`: method, path, headers, JSON body); disconnects of hanging
requests are recorded in `disconnects`. `models_gate`, when set to an `asyncio.Event`, holds every
`GET /models` answer (the request is recorded first) until the event is set.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import web

from .base import LoopbackEmulator


@dataclass
class OpenAIEmulator(LoopbackEmulator):
    """Start with `await emulator.start()`; `base_url` then points at it (`.../v1`)."""

    models: tuple[str, ...] = ("gpt-4o-mini", "emulated-model")
    served: dict[str, int] = field(default_factory=dict)  # requests per model name
    delay_s: float = 0.0  # added before every chat answer (to slow a whole deployment down)
    models_gate: asyncio.Event | None = None  # None: `/models` answers at once; else waits for the event
    prefixes: ClassVar[tuple[str, ...]] = ("/v1", "")

    @property
    def base_url(self) -> str:
        """API root including `/v1`, as `OPENAI_BASE_URL` expects."""
        return f"http://127.0.0.1:{self.port}/v1"

    def _routes(self, app: web.Application) -> None:
        for prefix in self.prefixes:
            app.router.add_post(f"{prefix}/chat/completions", self._chat)
            app.router.add_post(f"{prefix}/embeddings", self._embeddings)
            app.router.add_get(f"{prefix}/models", self._models)
            app.router.add_get(f"{prefix}/models/{{model}}", self._model)

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _error(
        status: int,
        message: str,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return web.json_response(body, status=status, headers={"x-request-id": "req_emulated", **(headers or {})})

    def _scenario_error(self, model: str) -> web.Response | None:
        if model.startswith("flaky-"):
            _, status, failures = model.split("-")
            if self.served.get(model, 0) <= int(failures):
                headers = {"retry-after-ms": "30"} if status == "429" else {}
                return self._error(int(status), f"emulated flaky failure {status}", None, "server_error", headers)
            return None
        if model.startswith("status-"):
            status = int(model.removeprefix("status-"))
            headers = {"retry-after-ms": "1500"} if status == 429 else {}
            type_ = "server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error"
            message = (
                "Incorrect API key provided: sk-abc***xyz."
                if status == 401
                else f"emulated failure with status {status}"
            )
            return self._error(status, message, None, type_, headers)
        if model == "context-length":
            return self._error(400, "This model's maximum context length is 8 tokens.", "context_length_exceeded")
        if model == "content-filter":
            return self._error(400, "Your request was rejected by the safety system.", "content_policy_violation")
        if model == "quota":
            return self._error(429, "You exceeded your current quota.", "insufficient_quota", "insufficient_quota")
        if model == "missing-model":
            return self._error(
                404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found"
            )
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
    def _last_user_text(body: dict[str, Any]) -> str:
        for message in reversed(body.get("messages", [])):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                return " ".join(p.get("text", "") for p in content or [] if p.get("type") == "text")
        return ""

    # --- routes ------------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        model = body.get("model", "")
        self.served[model] = self.served.get(model, 0) + 1
        error = self._scenario_error(model)
        if error is not None:
            return error
        if model == "hang":
            return await self._hang(request, "chat")
        if model == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)
        if model.startswith("slow-"):
            await asyncio.sleep(int(model.removeprefix("slow-")) / 1000)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if model == "malformed":
            return web.Response(text="{not json", content_type="application/json")
        text = f"echo: {self._last_user_text(body)}"
        usage = {
            "prompt_tokens": 11,
            "completion_tokens": 7,
            "total_tokens": 18,
            "prompt_tokens_details": {"cached_tokens": 2},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        finish = "length" if model == "length" else "tool_calls" if model == "tools" else "stop"
        tool_calls = [
            {
                "id": "call_emul_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ]
        if body.get("stream"):
            return await self._stream(request, model, text, finish, usage, tool_calls)
        message: dict[str, Any] = {"role": "assistant", "content": None if model == "tools" else text, "refusal": None}
        if model == "tools":
            message["tool_calls"] = tool_calls
        completion: dict[str, Any] = {
            "id": "chatcmpl-emulated",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        }
        if model != "no-usage":
            completion["usage"] = usage
        return web.json_response(completion, headers={"x-request-id": "req_emulated"})

    async def _stream(
        self,
        request: web.Request,
        model: str,
        text: str,
        finish: str,
        usage: dict[str, Any],
        tool_calls: list[dict[str, Any]],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-request-id": "req_emulated"})
        await response.prepare(request)
        base = {
            "id": "chatcmpl-emulated",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        pace_s = int(model.removeprefix("paced-")) / 1000 if model.startswith("paced-") else 0.0

        async def send(obj: Any) -> None:
            payload = obj if isinstance(obj, str) else json.dumps(obj)
            await response.write(f"data: {payload}\n\n".encode())
            if pace_s:
                await asyncio.sleep(pace_s)

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        if model == "tools":
            await send(
                chunk(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_emul_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": ""},
                            }
                        ],
                    }
                )
            )
            for piece in ('{"city"', ':"Par', 'is"}'):
                await send(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
        else:
            await send(chunk({"role": "assistant", "content": ""}))
            pieces = [text[: len(text) // 3], text[len(text) // 3 : 2 * len(text) // 3], text[2 * len(text) // 3 :]]
            await send(chunk({"content": pieces[0]}))
            if model == "stall-stream":
                return await self._hang(request, "stream")
            if model == "drop-stream":
                assert request.transport is not None
                request.transport.close()
                return response
            if model == "stream-error":
                await send({"error": {"message": "upstream model crashed", "type": "server_error", "code": None}})
                return response
            if model == "truncated":
                await send("[DONE]")
                return response
            for piece in pieces[1:]:
                await send(chunk({"content": piece}))
        for final in self._final_chunks(chunk({}, finish), base, usage if model != "no-usage" else None):
            await send(final)
        await send("[DONE]")
        return response

    def _final_chunks(self, finish: dict[str, Any], base: dict[str, Any], usage: dict[str, Any] | None) -> list[Any]:
        """The finish-reason chunk, then (with usage) the `include_usage` chunk."""
        return [finish] if usage is None else [finish, {**base, "choices": [], "usage": usage}]

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        model = body.get("model", "")
        error = self._scenario_error(model)
        if error is not None:
            return error
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dims = int(body.get("dimensions") or 4)
        data = []
        for i, text in enumerate(inputs):
            vector = [float(len(text)), float(i)] + [0.5] * (dims - 2)
            if body.get("encoding_format") == "base64":
                encoded: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            else:
                encoded = vector
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        data.reverse()  # the API does not promise order; the gateway must sort by index
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)},
            }
        )

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.models_gate is not None:
            await self.models_gate.wait()
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 1715367049, "owned_by": "emulator"} for m in self.models
                ],
            }
        )

    async def _model(self, request: web.Request) -> web.Response:
        await self._record(request)
        model = request.match_info["model"]
        if model not in self.models:
            return self._error(404, f"The model `{model}` does not exist", "model_not_found")
        return web.json_response({"id": model, "object": "model", "created": 1715367049, "owned_by": "emulator"})
