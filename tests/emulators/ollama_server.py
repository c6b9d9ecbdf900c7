"""A loopback emulator of Ollama's native HTTP API (`/api/chat`, `/api/embed`, `/api/tags`,
`/api/show`).

Wire format per shared/reference/provider-wire-formats.md §4: NDJSON streams
(`application/x-ndjson`) whose last line has `done: true`; errors as `{"error": "<string>"}`;
an error inside a 200 stream is a final `{"error": ...}` line. Scenarios by model name:

| model                   | behaviour                                                              |
|-------------------------|------------------------------------------------------------------------|
| anything else           | answers "echo: <last user text>" (streamed as 3 lines + done line)     |
| `tools`                 | answers with a `get_weather` tool call (arguments as a JSON object)    |
| `status-<N>`            | HTTP N with `{"error": "..."}`                                         |
| `missing-model`         | 404 `{"error": "model 'missing-model' not found"}`                     |
| `hang`                  | never answers (records the client's disconnect)                        |
| `stream-error`          | streams one line, then `{"error": "..."}`                              |
| `truncated`             | streams one line and ends without a `done: true` line                  |
| `length`                | done_reason `length`                                                   |
| `ratelimited-<ms>`      | 429 `{"error": "..."}` with `retry-after-ms: <ms>`                     |
| `ratelimited-s-<s>`     | 429 `{"error": "..."}` with `retry-after: <s>` (seconds)               |
| `ratelimited-once-<ms>` | the first request with this model is as `ratelimited-<ms>`, later ones |
|                         | answer normally                                                        |

Scenarios apply to `/api/chat` and `/api/embed`. Every request is recorded (`requests`); `served`
counts requests per model and `arrivals` keeps their `time.monotonic()` arrival times.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .base import LoopbackEmulator

_STATS = {
    "total_duration": 182242375,
    "load_duration": 41295167,
    "prompt_eval_count": 13,
    "prompt_eval_duration": 24573166,
    "eval_count": 5,
    "eval_duration": 115959084,
}


@dataclass
class OllamaEmulator(LoopbackEmulator):
    """Start with `await emulator.start()`; `host` then points at it (as `OLLAMA_HOST` expects)."""

    models: tuple[str, ...] = ("llama3.2:latest", "nomic-embed-text:latest", "tinyllama:latest")
    served: dict[str, int] = field(default_factory=dict)  # chat/embed requests per model name
    arrivals: dict[str, list[float]] = field(default_factory=dict)  # their time.monotonic() per model

    @property
    def host(self) -> str:
        """Server root (no `/api`)."""
        return f"http://127.0.0.1:{self.port}"

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/api/chat", self._chat)
        app.router.add_post("/api/embed", self._embed)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/show", self._show)

    def _scenario_error(self, model: str) -> web.Response | None:
        """Counts the request for `model`, then its scenario's error response, if any."""
        self.served[model] = self.served.get(model, 0) + 1
        self.arrivals.setdefault(model, []).append(time.monotonic())
        if model.startswith("ratelimited-once-"):
            if self.served[model] > 1:
                return None
            return self._rate_limited(model, {"retry-after-ms": model.removeprefix("ratelimited-once-")})
        if model.startswith("ratelimited-s-"):
            return self._rate_limited(model, {"retry-after": model.removeprefix("ratelimited-s-")})
        if model.startswith("ratelimited-"):
            return self._rate_limited(model, {"retry-after-ms": model.removeprefix("ratelimited-")})
        if model.startswith("status-"):
            return web.json_response({"error": f"emulated failure {model}"}, status=int(model.removeprefix("status-")))
        if model == "missing-model":
            return web.json_response({"error": f"model '{model}' not found"}, status=404)
        return None

    @staticmethod
    def _rate_limited(model: str, headers: dict[str, str]) -> web.Response:
        return web.json_response({"error": f"emulated rate limit for {model}"}, status=429, headers=headers)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        model = body.get("model", "")
        error = self._scenario_error(model)
        if error is not None:
            return error
        if model == "hang":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.disconnects.append("chat")
                raise
        user = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        text = "" if model == "tools" else f"echo: {user}"
        reason = "length" if model == "length" else "stop"
        calls = [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}] if model == "tools" else []
        created = "2025-07-07T20:22:19.184789Z"
        if not body.get("stream", True):
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = calls
            return web.json_response(
                {
                    "model": model,
                    "created_at": created,
                    "message": message,
                    "done_reason": reason,
                    "done": True,
                    **_STATS,
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)

        async def line(obj: dict[str, Any]) -> None:
            await response.write((json.dumps(obj) + "\n").encode())

        pieces = [text[: len(text) // 2], text[len(text) // 2 :]] if text else []
        for i, piece in enumerate(pieces):
            await line(
                {
                    "model": model,
                    "created_at": created,
                    "message": {"role": "assistant", "content": piece},
                    "done": False,
                }
            )
            if i == 0 and model == "stream-error":
                await line({"error": "an error was encountered while running the model"})
                return response
            if i == 0 and model == "truncated":
                return response
        if calls:
            await line(
                {
                    "model": model,
                    "created_at": created,
                    "message": {"role": "assistant", "content": "", "tool_calls": calls},
                    "done": False,
                }
            )
        await line(
            {
                "model": model,
                "created_at": created,
                "message": {"role": "assistant", "content": ""},
                "done_reason": reason,
                "done": True,
                **_STATS,
            }
        )
        return response

    async def _embed(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        model = body.get("model", "")
        error = self._scenario_error(model)
        if error is not None:
            return error
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response(
            {
                "model": model,
                "embeddings": [[float(len(t)), 0.25, 0.5] for t in inputs],
                "total_duration": 14143917,
                "load_duration": 1019500,
                "prompt_eval_count": 2 * len(inputs),
            }
        )

    async def _tags(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            {
                "models": [
                    {
                        "name": m,
                        "model": m,
                        "modified_at": "2025-05-04T17:37:44.706015396-07:00",
                        "size": 2019393189,
                        "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
                        "details": {
                            "parent_model": "",
                            "format": "gguf",
                            "family": "llama",
                            "families": ["llama"],
                            "parameter_size": "3.2B",
                            "quantization_level": "Q4_K_M",
                        },
                    }
                    for m in self.models
                ]
            }
        )

    async def _show(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        name = body.get("model") or body.get("name")
        if name not in self.models:
            return web.json_response({"error": f"model '{name}' not found"}, status=404)
        return web.json_response(
            {
                "modelfile": "",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": {"format": "gguf", "family": "llama"},
                "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
                "capabilities": ["completion", "tools"],
            }
        )
