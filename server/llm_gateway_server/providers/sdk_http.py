"""The HTTP client under a Stainless SDK (openai, anthropic, groq): one pooled client per provider.

"aiohttp" is each SDK's documented `DefaultAioHttpClient` (httpx's interface over an aiohttp
transport; the SDKs' `[aiohttp]` extra), the cheaper of the two per call and per streamed chunk
(figures in bench/NOTES.md). "httpx" is the SDK default
(`DefaultAsyncHttpxClient`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .base import HttpClientKind


def sdk_http_client(sdk: ModuleType, limits_type: type, kind: HttpClientKind, max_connections: int) -> Any:
    """Builds the SDK's async HTTP client of `kind` with a pool of `max_connections` (all kept alive).

    Args:
        sdk: the SDK module, which exports `DefaultAioHttpClient` and `DefaultAsyncHttpxClient`.
        limits_type: the `Limits` class of the httpx flavour that SDK is built on (httpx or httpx2).
        kind: "aiohttp" or "httpx".
        max_connections: connection pool size.
    """
    limits = limits_type(max_connections=max_connections, max_keepalive_connections=max_connections)
    factory = sdk.DefaultAioHttpClient if kind == "aiohttp" else sdk.DefaultAsyncHttpxClient
    return factory(limits=limits)
