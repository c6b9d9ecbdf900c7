"""The hot path's HTTP: chat, streamed chat and embeddings sent on one pooled aiohttp session per
provider, with the URL and headers the provider's official SDK client would send.

The official SDK (openai, anthropic, groq) stays the source of each provider's configuration: at
start-up, `DirectHttp.from_sdk_client` reads the client's public `base_url`, `auth_headers` and
`default_headers` (API version, user agent, the SDK's platform headers) once. Per call, only the
gateway's JSON body is serialised and sent: none of the SDK's per-call request building, parameter
transformation, response models or retry machinery runs (2.2 M of a unary call's 4.75 M
instructions before this path, `bench/INSTRUCTIONS.md`). Off the hot path (model lists, token
counting) the SDK client itself is still used.

Transport semantics follow what the SDKs' aiohttp transport did: per-operation timeouts
(connect, socket read) of the call's remaining deadline, no redirects followed for POSTs, HTTP/1.1
keep-alive with a bounded pool, `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` honoured (read once when
the session is created, as the SDKs' clients read them once at construction: aiohttp's per-request
`trust_env` lookup costs two thread hand-offs per call), no cookies kept (an upstream's cookie
never reaches another tenant's call), and certificate verification by `httpx.create_ssl_context`
(certifi, or `SSL_CERT_FILE` / `SSL_CERT_DIR`), built once per process and shared by every
provider and SDK client. Upstream error
statuses map through the shared status table (`providers.errors`); transport failures map to
connection failures and timeouts there too.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import httpx
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from ..errors import GatewayError
from . import errors

# Largest non-streamed response body read, bytes (a chat answer or an embeddings batch of 2048
# vectors of 3072 floats is ~60 MiB of JSON at most).
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# Largest upstream error body read, bytes (the message is clipped to 500 characters anyway).
MAX_ERROR_BODY_BYTES = 64 * 1024
# aiohttp's read buffer, bytes.
READ_BUFFER_BYTES = 256 * 1024
# Largest server-sent event of a stream, bytes (one chunk of JSON: a few hundred bytes usually, a
# tool call's arguments at most); longer is a bad response rather than unbounded memory.
MAX_SSE_EVENT_BYTES = 1024 * 1024
# Idle pooled connections are closed after this long, seconds (httpx's default keep-alive expiry,
# which the SDKs' clients used).
KEEPALIVE_S = 5.0
# After a stream's end marker, how long the rest of its body may take to arrive (reading it to its
# end keeps the HTTP/1.1 connection in the pool; a server that never ends the body only costs this).
DRAIN_AFTER_END_S = 0.25

ErrorFields = Callable[[object], tuple[str, str]]


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """The process's one TLS client context: `httpx.create_ssl_context(trust_env=True)`, i.e. the
    certifi bundle, or `SSL_CERT_FILE` / `SSL_CERT_DIR` when set — the verification the SDKs'
    transports apply. Loading a CA bundle costs ~15 ms of CPU, so it is built once and shared."""
    return httpx.create_ssl_context(trust_env=True)


def _sdk_headers(client: Any) -> dict[str, str]:
    """The headers an SDK client sends on every request: its auth headers and default headers
    (values the SDK omits are `Omit` markers, not strings, and are left out), plus the retry count
    the SDK reports (always 0: the gateway owns retries and each attempt is a first try for the
    SDK's accounting)."""
    merged: dict[str, object] = {**client.auth_headers, **client.default_headers}
    headers = {name: value for name, value in merged.items() if isinstance(value, str)}
    headers["X-Stainless-Retry-Count"] = "0"
    return headers


class DirectHttp:
    """One provider's pooled HTTP session for the hot path.

    Args:
        provider: the configured provider name (error metadata).
        base_url: API root with a trailing slash, e.g. "https://api.openai.com/v1/".
        headers: sent on every request (auth, API version, user agent, content type).
        max_connections: pool size (connections kept alive, per provider).
        error_fields: reads (message, code) from a parsed error body (the wire mapping's).
    """

    def __init__(
        self,
        provider: str,
        base_url: str,
        headers: Mapping[str, str],
        max_connections: int,
        error_fields: ErrorFields,
    ) -> None:
        self.provider = provider
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.headers = dict(headers)
        self._max_connections = max_connections
        self._error_fields = error_fields
        self._session: aiohttp.ClientSession | None = None
        self._proxy: URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None

    @classmethod
    def from_sdk_client(cls, provider: str, client: Any, max_connections: int, error_fields: ErrorFields) -> DirectHttp:
        """Takes the URL and headers from a Stainless SDK client (public `base_url`,
        `auth_headers`, `default_headers`), once."""
        return cls(provider, str(client.base_url), _sdk_headers(client), max_connections, error_fields)

    def url(self, path: str) -> str:
        """The absolute URL of an API path, joined as the SDKs join it (`"chat/completions"` or
        `"/chat/completions"` under the base URL's path)."""
        return self.base_url + path.lstrip("/")

    def _client(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            # Created on first use, inside the serving event loop.
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=KEEPALIVE_S, ssl=shared_ssl_context()
            )
            session = self._session = aiohttp.ClientSession(
                connector=connector, read_bufsize=READ_BUFFER_BYTES, cookie_jar=aiohttp.DummyCookieJar()
            )
            self._proxy, self._proxy_auth = environment_proxy(self.base_url)
        return session

    async def _send(self, path: str, body: Mapping[str, Any], timeout_s: float) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s)
        return await self._client().post(
            self.url(path),
            data=json.dumps(body, separators=(",", ":")).encode(),  # compact, as the SDKs send it
            headers=self.headers,
            timeout=timeout,
            allow_redirects=False,
            proxy=self._proxy,
            proxy_auth=self._proxy_auth,
        )

    async def post_json(self, path: str, body: Mapping[str, Any], model: str, timeout_s: float) -> Any:
        """POSTs `body` as JSON and returns the parsed JSON answer.

        Args:
            path: API path under the base URL, e.g. "chat/completions".
            body: the provider's request body.
            model: the provider model id (error metadata).
            timeout_s: connect and per-read timeout, seconds (the call's remaining deadline).
        Raises:
            GatewayError: an error status (the shared status table, with the provider's message,
                code and retry-after), a connection failure or timeout, or an unusable body.
        """
        response = await self.open_stream(path, body, model, timeout_s)
        try:
            raw = await _read_bounded(response, MAX_RESPONSE_BYTES)
        except Exception as exc:
            raise self.map_error(exc, model, timeout_s) from exc
        finally:
            response.release()
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise errors.bad_response(self.provider, model, f"the body is not JSON: {exc}") from exc

    async def open_stream(
        self, path: str, body: Mapping[str, Any], model: str, timeout_s: float
    ) -> aiohttp.ClientResponse:
        """POSTs a request and returns the response once its status is a success, its body unread;
        a stream's caller reads it with `sse_data` and ends it with `end_stream` (`post_json`
        reads and releases it itself).

        Raises:
            GatewayError: as `post_json` (the connection of an error answer is released).
        """
        try:
            response = await self._send(path, body, timeout_s)
            if response.status >= 400:
                try:
                    raise await self._status_error(response, model)
                finally:
                    response.release()
        except GatewayError:
            raise
        except Exception as exc:
            raise self.map_error(exc, model, timeout_s) from exc
        return response

    async def end_stream(self, response: aiohttp.ClientResponse, *, complete: bool) -> None:
        """Ends a stream from `open_stream`. `complete`: its end marker was read, so the rest of
        the body is drained (≤ `DRAIN_AFTER_END_S`) and the connection goes back to the pool;
        otherwise (an error, a cancel, a consumer that left) the connection is closed at once, so
        the upstream sees the disconnect and stops generating."""
        if not complete:
            response.close()
            return
        try:
            async with asyncio.timeout(DRAIN_AFTER_END_S):
                while await response.content.readany():
                    pass
        except (TimeoutError, aiohttp.ClientError):
            response.close()
            return
        response.release()

    async def _status_error(self, response: aiohttp.ClientResponse, model: str) -> GatewayError:
        """The gateway error for an upstream error status: its JSON body read through the wire
        mapping's `error_fields` (a non-JSON body is the message), its retry-after headers."""
        try:
            raw = await _read_bounded(response, MAX_ERROR_BODY_BYTES, truncate=True)
        except (aiohttp.ClientError, TimeoutError):
            raw = b""
        text = raw.decode("utf-8", "replace")
        try:
            parsed: object = json.loads(text)
        except ValueError:
            parsed = text
        message, code = self._error_fields(parsed)
        return errors.from_http_status(
            self.provider,
            model,
            response.status,
            message or text or (response.reason or ""),
            upstream_code=code,
            retry_after_s=errors.parse_retry_after(dict(response.headers)),
        )

    def map_error(self, exc: BaseException, model: str, timeout_s: float) -> GatewayError:
        """A transport exception of this session → GatewayError: timeouts (connect, socket read)
        → PROVIDER_UNAVAILABLE timeout; refused, reset or dropped connections and truncated bodies
        → PROVIDER_UNAVAILABLE connection; anything else → PROVIDER_BAD_RESPONSE."""
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError / ConnectionTimeoutError too
            return errors.upstream_timeout(self.provider, model, timeout_s)
        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)):
            return errors.connection_failed(self.provider, model, repr(exc))
        return errors.bad_response(self.provider, model, f"{type(exc).__name__}: {exc}")

    async def aclose(self) -> None:
        """Closes the session and its pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def environment_proxy(url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The proxy the environment names for `url` (`HTTPS_PROXY` / `HTTP_PROXY` by its scheme,
    unless `NO_PROXY` exempts its host; credentials from the proxy URL or `.netrc`), or (None,
    None): aiohttp's own `trust_env` rule, applied once."""
    try:
        return get_env_proxy_for_url(URL(url))
    except LookupError:
        return None, None


async def _read_bounded(response: aiohttp.ClientResponse, limit: int, *, truncate: bool = False) -> bytes:
    """The whole body, at most `limit` bytes: longer is PROVIDER_BAD_RESPONSE (a ValueError here,
    mapped by the caller), or with `truncate` its first `limit` bytes."""
    length = response.content_length
    if length is not None and length > limit and not truncate:
        raise ValueError(f"the response body is {length} bytes, more than the {limit} accepted")
    if length is not None and length <= limit:
        return await response.read()
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if truncate:
                return b"".join(chunks)[:limit]
            raise ValueError(f"the response body is more than the {limit} bytes accepted")
    return b"".join(chunks)


async def sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The `data` of each server-sent event of a stream (text/event-stream: lines of `field:
    value` ending in LF or CRLF, an event ends at a blank line, several `data` lines join with
    LF; `event`, `id`, `retry` and comments are skipped: every provider here repeats the event
    type in its JSON). The body is read as it arrives, chunk by chunk, and split here: one read
    per network chunk, not two line reads per event.

    Raises:
        ValueError: one event longer than `MAX_SSE_EVENT_BYTES` (a bad response, not unbounded
            memory).
        aiohttp.ClientError: the connection dropped.
    """
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer = (buffer + chunk) if buffer else chunk
        if b"\r" in buffer:  # the buffer's: a CRLF may be split between two chunks
            buffer = buffer.replace(b"\r\n", b"\n")
        if b"\n\n" not in buffer:
            if len(buffer) > MAX_SSE_EVENT_BYTES:
                raise ValueError(f"a stream event is longer than {MAX_SSE_EVENT_BYTES} bytes")
            continue
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if len(event) > MAX_SSE_EVENT_BYTES:
                raise ValueError(f"a stream event is longer than {MAX_SSE_EVENT_BYTES} bytes")
            data = _event_data(event)
            if data is not None:
                yield data
    if buffer.strip():
        data = _event_data(buffer.rstrip(b"\n"))
        if data is not None:
            yield data


def _event_data(event: bytes) -> bytes | None:
    """The joined `data` lines of one event's text (no blank line in it), or None without any."""
    if event.startswith(b"data:") and b"\n" not in event:  # the usual event: one data line
        value = event[5:]
        return value[1:] if value.startswith(b" ") else value
    values = [
        line[6:] if line.startswith(b"data: ") else line[5:] for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    return b"\n".join(values) if values else None
