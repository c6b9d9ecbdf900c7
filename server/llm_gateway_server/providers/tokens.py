"""Token counting without a provider round trip.

* OpenAI-family models: the model's BPE encoding from `bpe-openai` (ships cl100k_base and
  o200k_base offline and matches tiktoken), plus the chat framing of OpenAI's cookbook "How to
  count tokens with tiktoken" (3 tokens per message, 1 per name, 3 to prime the reply).
* Anything else: the estimate of `estimates` (4 characters per token plus framing), marked as an
  estimate.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import bpe_openai

from ..domain import ChatRequest, TokenCount, TokenCountMethod
from ..estimates import estimate_input_tokens

# OpenAI cookbook framing for chat models since gpt-3.5-turbo-0613.
_OPENAI_TOKENS_PER_MESSAGE = 3
_OPENAI_TOKENS_PER_NAME = 1
_OPENAI_REPLY_PRIMING = 3
# Model-id prefixes and their encodings (OpenAI model pages: o200k_base for GPT-4o and later,
# cl100k_base for GPT-4 / GPT-3.5 and the text-embedding-3 models).
_ENCODING_BY_PREFIX = (
    ("gpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("gpt-oss", "o200k_base"),
    ("openai/gpt-oss", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
    ("text-embedding-3", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"),
)


def _tools_text(request: ChatRequest) -> str:
    return "".join(t.name + t.description + json.dumps(dict(t.parameters or {})) for t in request.tools)


def openai_encoding_name(model: str) -> str | None:
    """The BPE encoding of an OpenAI-family model id, or None for other models."""
    for prefix, name in _ENCODING_BY_PREFIX:
        if model.startswith(prefix):
            return name
    return None


@functools.cache
def _encoding(name: str) -> bpe_openai.Encoding:
    import bpe_openai  # noqa: PLC0415 - loading the encodings takes ~1 s: only when first needed

    return bpe_openai.get_encoding(name)


# bpe-openai refuses to encode very long inputs at once ("Input too long to encode safely");
# longer texts are encoded in pieces cut at whitespace (BPE pieces start at a space, so the sum is
# the whole text's count, or within a token per cut where a piece has no whitespace to cut at).
_PIECE_CHARS = 50_000


def _encoded_len(encoding: bpe_openai.Encoding, text: str) -> int:
    """Tokens of `text` under `encoding`, for any length."""
    if len(text) <= _PIECE_CHARS:
        return len(encoding.encode(text))
    total, start = 0, 0
    while start < len(text):
        end = min(start + _PIECE_CHARS, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
            end = cut if cut > start else end
        total += len(encoding.encode(text[start:end]))
        start = end
    return total


def count_with_tokenizer(request: ChatRequest, model: str, provider: str) -> TokenCount | None:
    """Exact text-token count for OpenAI-family models (None for other models). Images are not
    counted (their cost depends on size and detail); tool definitions count as their JSON text."""
    name = openai_encoding_name(model)
    if name is None:
        return None
    encoding = _encoding(name)
    total = _OPENAI_REPLY_PRIMING
    for message in request.messages:
        total += _OPENAI_TOKENS_PER_MESSAGE + _encoded_len(encoding, message.role.value)
        total += _encoded_len(encoding, message.text)
        for call in message.tool_calls:
            total += _encoded_len(encoding, call.name) + _encoded_len(encoding, call.arguments)
        if message.name:
            total += _OPENAI_TOKENS_PER_NAME + _encoded_len(encoding, message.name)
    tools = _tools_text(request)
    if tools:
        total += _encoded_len(encoding, tools)
    return TokenCount(total, TokenCountMethod.TOKENIZER, tokenizer=name, model=model, provider=provider)


def estimate(request: ChatRequest, model: str, provider: str) -> TokenCount:
    """The documented estimate, marked ESTIMATE."""
    tokens = estimate_input_tokens(request.messages, _tools_text(request))
    return TokenCount(tokens, TokenCountMethod.ESTIMATE, model=model, provider=provider)
