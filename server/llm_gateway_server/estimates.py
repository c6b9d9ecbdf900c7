"""Token estimates without a tokenizer: 4 characters per token plus 4 tokens of framing per
message — OpenAI's rule of thumb ("one token ≈ 4 characters of English", help.openai.com, "What
are tokens"). Used where counts are needed before (rate limits, deployment TPM) or without
(providers that report no usage) a provider's own count; results are marked estimated.
"""

from __future__ import annotations

from collections.abc import Iterable

from .domain import Message

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


def estimate_tokens(text_length: int) -> int:
    """Estimated tokens for `text_length` characters (0 for 0 or less)."""
    return max(text_length + CHARS_PER_TOKEN - 1, 0) // CHARS_PER_TOKEN


def estimate_input_tokens(messages: Iterable[Message], extra_text: str = "") -> int:
    """Estimated input tokens of a conversation (text only; images not counted)."""
    total = sum(estimate_tokens(len(m.text)) + TOKENS_PER_MESSAGE for m in messages)
    return total + estimate_tokens(len(extra_text))
