"""structlog set-up: one JSON object per line on stdout, secrets redacted by a processor."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Event keys whose values are never logged, whatever the caller passes.
SECRET_KEYS = frozenset({"api_key", "authorization", "x-api-key", "password", "secret", "token"})
# Key-looking substrings inside free text (OpenAI/Groq/Anthropic key formats, bearer tokens).
_SECRET_TEXT = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|gsk_[A-Za-z0-9]{8,}|Bearer\s+[A-Za-z0-9._\-]{8,})")


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drops secret-named keys and masks key-looking text in strings."""
    for key in list(event):
        if key.lower() in SECRET_KEYS:
            event[key] = "[redacted]"
        elif isinstance(event[key], str) and ("sk-" in event[key] or "Bearer" in event[key] or "gsk_" in event[key]):
            event[key] = _SECRET_TEXT.sub("[redacted]", event[key])
    return event


class _Tee:
    """Writes log lines to stdout and to a file."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives as long as the process

    def write(self, text: str) -> int:
        sys.stdout.write(text)
        return self._file.write(text)

    def flush(self) -> None:
        sys.stdout.flush()
        self._file.flush()


def configure_logging(level: str = "info", log_file: str | None = None) -> None:
    """Configures structlog for JSON lines on stdout (and `log_file`, if given) at `level`
    (debug/info/warning/error)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(file=_Tee(log_file) if log_file else sys.stdout),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
