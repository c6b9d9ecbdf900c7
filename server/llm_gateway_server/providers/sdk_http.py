"""The HTTP client under a Stainless SDK client (openai, anthropic, groq), which serves the
endpoints off the hot path (model lists, token counting; chat, streams and embeddings go through
`direct_http`).

"aiohttp" is each SDK's documented `DefaultAioHttpClient` (httpx's interface over an aiohttp
transport; the SDKs' `[aiohttp]` extra); "httpx" is the SDK default (`DefaultAsyncHttpxClient`).
Both verify certificates with the process's shared TLS context (`direct_http.shared_ssl_context`),
so building a client does not load a CA bundle again.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .base import HttpClientKind
from .direct_http import shared_ssl_context


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
    return factory(limits=limits, verify=shared_ssl_context())
