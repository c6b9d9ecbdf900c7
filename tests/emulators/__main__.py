"""Run an emulator standalone: `python -m tests.emulators {openai|ollama} [--port N]`.

Handy for trying the gateway by hand (e.g. `OPENAI_BASE_URL=http://127.0.0.1:N/v1 make run`)."""

from __future__ import annotations

import argparse
import asyncio

from .ollama_server import OllamaEmulator
from .openai_server import OpenAIEmulator


async def _run(kind: str, port: int) -> None:
    emulator: OpenAIEmulator | OllamaEmulator = OpenAIEmulator() if kind == "openai" else OllamaEmulator()
    emulator.port = port
    await emulator.start()
    print(f"{kind} emulator on 127.0.0.1:{emulator.port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.emulators")
    parser.add_argument("kind", choices=["openai", "ollama"])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(_run(args.kind, args.port))


if __name__ == "__main__":
    main()
