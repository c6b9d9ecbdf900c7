"""A loopback emulator of Groq's OpenAI-compatible API, served under `/openai/v1/...` as the groq SDK
calls it (shared/reference/provider-wire-formats.md §2): the same scenarios as `OpenAIEmulator`,
except that stream usage arrives in the final chunk's `x_groq.usage` (Groq's own form) and there is
no separate `include_usage` chunk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .openai_server import OpenAIEmulator


@dataclass
class GroqEmulator(OpenAIEmulator):
    """`base_url` is the server root: the groq SDK adds `/openai/v1` itself."""

    models: tuple[str, ...] = ("llama-3.1-8b-instant", "groq-emulated")
    prefixes: ClassVar[tuple[str, ...]] = ("/openai/v1",)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _final_chunks(self, finish: dict[str, Any], base: dict[str, Any], usage: dict[str, Any] | None) -> list[Any]:
        x_groq: dict[str, Any] = {"id": "req_groq_emulated"}
        if usage is not None:
            x_groq["usage"] = {
                **usage,
                "queue_time": 0.01,
                "prompt_time": 0.001,
                "completion_time": 0.002,
                "total_time": 0.003,
            }
        return [{**finish, "x_groq": x_groq}]
