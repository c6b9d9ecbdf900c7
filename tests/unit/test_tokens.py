"""Table tests of the pure token estimates: `estimates` (4 characters per token plus per-message
framing; moved there from `providers/tokens.py`) and the pure parts of `providers.tokens` (the
request estimate and the OpenAI model → BPE encoding table). No tokenizer is loaded here."""

from __future__ import annotations

import pytest

from llm_gateway_server import estimates
from llm_gateway_server.domain import (
    ChatRequest,
    ImagePart,
    Message,
    Role,
    TextPart,
    TokenCount,
    TokenCountMethod,
    Tool,
)
from llm_gateway_server.providers import tokens


def _msg(text: str, role: Role = Role.USER) -> Message:
    return Message(role, (TextPart(text),))


WEATHER = Tool("get_weather", "w", {"type": "object", "properties": {"city": {"type": "string"}}})  # 74 chars of text


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        pytest.param(-5, 0, id="negative-is-zero"),
        pytest.param(0, 0, id="empty"),
        pytest.param(1, 1, id="one-char-rounds-up"),
        pytest.param(3, 1, id="three"),
        pytest.param(4, 1, id="four"),
        pytest.param(5, 2, id="five"),
        pytest.param(8, 2, id="eight"),
        pytest.param(9, 3, id="nine"),
        pytest.param(400, 100, id="four-hundred"),
        pytest.param(401, 101, id="four-hundred-one"),
    ],
)
def test_estimate_tokens(length: int, expected: int) -> None:
    assert estimates.estimate_tokens(length) == expected


@pytest.mark.parametrize(
    ("messages", "extra_text", "expected"),
    [
        pytest.param((), "", 0, id="nothing"),
        pytest.param((_msg(""),), "", 4, id="empty-message-is-framing-only"),
        pytest.param((_msg("hi"),), "", 1 + 4, id="one-message"),
        pytest.param((_msg("be brief", Role.SYSTEM), _msg("hello world")), "", (2 + 4) + (3 + 4), id="two-messages"),
        pytest.param(
            (Message(Role.USER, (TextPart("abcd"), TextPart("efgh"))),), "", 2 + 4, id="text-parts-counted-together"
        ),
        pytest.param(
            (Message(Role.USER, (TextPart("look"), ImagePart(url="https://example.com/cat.png"))),),
            "",
            1 + 4,
            id="images-not-counted",
        ),
        pytest.param((_msg("hi"),), "abcdefgh", 1 + 4 + 2, id="extra-text"),
        pytest.param((), "abc", 1, id="extra-text-only"),
    ],
)
def test_estimate_input_tokens(messages: tuple[Message, ...], extra_text: str, expected: int) -> None:
    assert estimates.estimate_input_tokens(messages, extra_text) == expected


@pytest.mark.parametrize(
    ("tools", "expected"),
    [
        pytest.param((), 13, id="messages-only"),
        # "now" + "" + "{}" = 5 chars → 2 tokens
        pytest.param((Tool("now"),), 13 + 2, id="tool-without-parameters"),
        # "get_weather" + "w" + 62 chars of JSON schema = 74 chars → 19 tokens
        pytest.param((WEATHER,), 13 + 19, id="tool-with-schema"),
        pytest.param((WEATHER, Tool("now")), 13 + 20, id="tools-text-estimated-together"),
    ],
)
def test_estimate(tools: tuple[Tool, ...], expected: int) -> None:
    # "be brief" (8 chars: 2 + 4 framing) + "hello world" (11 chars: 3 + 4 framing) = 13
    request = ChatRequest(model="alias", messages=(_msg("be brief", Role.SYSTEM), _msg("hello world")), tools=tools)
    assert tokens.estimate(request, "llama3.2", "ollama") == TokenCount(
        expected, TokenCountMethod.ESTIMATE, tokenizer="", model="llama3.2", provider="ollama"
    )


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        pytest.param("gpt-4o", "o200k_base", id="gpt-4o"),
        pytest.param("gpt-4o-mini-2024-07-18", "o200k_base", id="gpt-4o-mini"),
        pytest.param("gpt-4.1-nano", "o200k_base", id="gpt-4.1"),
        pytest.param("gpt-4.5-preview", "o200k_base", id="gpt-4.5"),
        pytest.param("gpt-5", "o200k_base", id="gpt-5"),
        pytest.param("gpt-5-mini", "o200k_base", id="gpt-5-mini"),
        pytest.param("chatgpt-4o-latest", "o200k_base", id="chatgpt-4o"),
        pytest.param("o1", "o200k_base", id="o1"),
        pytest.param("o1-mini", "o200k_base", id="o1-mini"),
        pytest.param("o3-mini", "o200k_base", id="o3-mini"),
        pytest.param("o4-mini", "o200k_base", id="o4-mini"),
        pytest.param("gpt-oss-20b", "o200k_base", id="gpt-oss"),
        pytest.param("openai/gpt-oss-120b", "o200k_base", id="groq-openai-gpt-oss"),
        pytest.param("gpt-4", "cl100k_base", id="gpt-4"),
        pytest.param("gpt-4-turbo", "cl100k_base", id="gpt-4-turbo"),
        pytest.param("gpt-4-0613", "cl100k_base", id="gpt-4-0613"),
        pytest.param("gpt-3.5-turbo", "cl100k_base", id="gpt-3.5-turbo"),
        pytest.param("text-embedding-3-small", "cl100k_base", id="text-embedding-3-small"),
        pytest.param("text-embedding-ada-002", "cl100k_base", id="text-embedding-ada-002"),
        pytest.param("llama3.2", None, id="ollama-model"),
        pytest.param("llama-3.1-8b-instant", None, id="groq-llama"),
        pytest.param("claude-sonnet-4-20250514", None, id="anthropic-model"),
        pytest.param("", None, id="empty"),
    ],
)
def test_openai_encoding_name(model: str, encoding: str | None) -> None:
    assert tokens.openai_encoding_name(model) == encoding


def test_count_with_tokenizer_is_none_for_other_models() -> None:
    # Returns before loading any encoding, so it stays fast.
    request = ChatRequest(model="alias", messages=(_msg("hi"),))
    assert tokens.count_with_tokenizer(request, "claude-sonnet-4-20250514", "anthropic") is None
