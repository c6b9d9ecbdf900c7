"""What the adapters on the Stainless-generated SDKs (openai, anthropic, groq) share: their pooled
hot-path session (`SdkCalls`) and SDK exception → GatewayError, for SDKs which share one exception
hierarchy (`APIStatusError`, `APITimeoutError`, `APIConnectionError`,
`APIResponseValidationError`, `APIError`). Each adapter passes its SDK module and the function
that reads its error body; the HTTP-status rows live in `providers.errors`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any, ClassVar

import aiohttp
import httpx
import httpx2

from ..errors import GatewayError
from . import errors
from .base import ProviderConfig
from .direct_http import DirectHttp

ErrorFields = Callable[[object], tuple[str, str]]


def _dropped_connection(exc: BaseException) -> aiohttp.ClientConnectionError | None:
    """The aiohttp connection error (not a timeout) behind `exc`, or None.

    The SDKs' aiohttp transport maps every `aiohttp.ClientConnectionError` to httpx's
    `ConnectTimeout`, which the SDK raises as `APITimeoutError`; a refused or dropped connection
    is a connection failure, not a timeout, so the cause chain decides.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # the chain is short: SDK error <- httpx error <- aiohttp error
        if seen is None:
            return None
        if isinstance(seen, aiohttp.ClientConnectionError) and not isinstance(seen, TimeoutError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def map_sdk_error(
    sdk: ModuleType, exc: Exception, provider: str, model: str, timeout_s: float, error_fields: ErrorFields
) -> GatewayError:
    """Maps an exception raised by a Stainless SDK call (or its HTTP client) for `provider`.

    Args:
        sdk: the SDK module (openai, anthropic or groq).
        exc: what the call raised.
        provider / model: for the error's metadata.
        timeout_s: the call's timeout (reported on timeouts).
        error_fields: reads (message, code) from the SDK's `e.body`.
    """
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, sdk.APIStatusError):
        message, code = error_fields(exc.body)
        if exc.status_code < 400:  # an error event inside a 200 stream (anthropic raises it this way)
            return errors.from_http_status(provider, model, -1, message or exc.message, upstream_code=code)
        return errors.from_http_status(
            provider,
            model,
            exc.status_code,
            message or exc.message,
            upstream_code=code,
            retry_after_s=errors.parse_retry_after(dict(exc.response.headers)),
        )
    if isinstance(exc, sdk.APITimeoutError):
        dropped = _dropped_connection(exc)
        if dropped is not None:
            return errors.connection_failed(provider, model, repr(dropped))
        return errors.upstream_timeout(provider, model, timeout_s)
    if isinstance(exc, sdk.APIConnectionError):
        return errors.connection_failed(provider, model, str(exc.__cause__ or exc))
    if isinstance(exc, sdk.APIResponseValidationError):
        return errors.bad_response(provider, model, exc.message)
    if isinstance(exc, sdk.APIError):  # an error object inside an SSE stream
        message, code = error_fields(exc.body)
        return errors.from_http_status(provider, model, -1, message or exc.message, upstream_code=code)
    if isinstance(exc, (httpx2.TransportError, httpx.TransportError)):
        return errors.connection_failed(provider, model, repr(exc))
    if isinstance(exc, (json.JSONDecodeError, ValueError, TypeError, KeyError, AttributeError)):
        return errors.bad_response(provider, model, f"{type(exc).__name__}: {exc}")
    return errors.bad_response(provider, model, f"unexpected {type(exc).__name__}")


class SdkCalls:
    """Mixin for adapters on a Stainless SDK (listed before `Provider` in the bases): after
    `Provider.__init__` made the SDK client, `_http` is the provider's pooled hot-path session with
    that client's URL and headers (`DirectHttp`); `_call` runs an SDK call (off the hot path) and
    maps whatever it raises with `map_sdk_error`; `aclose` closes both. Subclasses set `_sdk` (the
    SDK module) and `_wire` (their wire mapping module, whose `error_fields` reads error bodies)."""

    name: str
    _client: Any
    _sdk: ModuleType
    _wire: ClassVar[ModuleType]
    _http: DirectHttp

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)  # type: ignore[call-arg]  # Provider.__init__, next in the MRO
        fields = self._wire.error_fields
        self._http = DirectHttp.from_sdk_client(self.name, self._client, config.max_connections, fields)

    async def aclose(self) -> None:
        """Closes the pooled session and the SDK client's connection pool."""
        await self._http.aclose()
        await self._client.close()

    async def _call(self, model: str, timeout_s: float, make: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await make()
        except Exception as exc:
            raise self._map(exc, model, timeout_s) from exc

    def _map(self, exc: Exception, model: str, timeout_s: float) -> GatewayError:
        """SDK exception → GatewayError (the HTTP-status rows are in `providers.errors`)."""
        return map_sdk_error(self._sdk, exc, self.name, model, timeout_s, self._wire.error_fields)
