"""Sync and asyncio clients wrapping `llm_gateway.v1` stubs, with rich error decoding."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
PathLike = str | os.PathLike[str]


class GatewayCallError(Exception):
    """A failed gateway call.

    Attributes:
        code: the gRPC status code.
        message: the status message.
        reason: `ErrorInfo.reason` (UPPER_SNAKE), "" when the server sent no details.
        metadata: `ErrorInfo.metadata` (provider, model, upstream_status, request_id, ...).
        retry_after_s: `RetryInfo.retry_delay` in seconds, None when absent.
    """

    def __init__(self, error: grpc.RpcError) -> None:
        self.code: grpc.StatusCode = error.code()
        self.message: str = error.details() or ""
        self.reason = ""
        self.metadata: dict[str, str] = {}
        self.retry_after_s: float | None = None
        for key, value in error.trailing_metadata() or ():
            if key == "grpc-status-details-bin":
                self._decode(value)
        super().__init__(f"{self.code.name} {self.reason}: {self.message}")

    def _decode(self, raw: bytes) -> None:
        status = status_pb2.Status.FromString(raw)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                self.reason, self.metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                self.retry_after_s = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9


def _messages(prompt: str | Sequence[pb.Message], system: str | None) -> list[pb.Message]:
    messages = [pb.Message(role=pb.ROLE_SYSTEM, content=[pb.ContentPart(text=system)])] if system else []
    if isinstance(prompt, str):
        messages.append(pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=prompt)]))
    else:
        messages.extend(prompt)
    return messages


def build_chat_request(
    model: str, prompt: str | Sequence[pb.Message], *, system: str | None = None, provider: str = "", **fields: Any
) -> pb.ChatRequest:
    """A ChatRequest from a prompt (or messages), an optional system prompt and a provider hint;
    `fields` are further ChatRequest fields (e.g. `generation=pb.GenerationOptions(...)`)."""
    if provider:
        fields["routing"] = pb.RoutingOptions(provider=provider)
    return pb.ChatRequest(model=model, messages=_messages(prompt, system), **fields)


def build_chat_stream_request(
    model: str, prompt: str | Sequence[pb.Message], *, system: str | None = None, provider: str = "", **fields: Any
) -> pb.ChatStreamRequest:
    """The ChatStreamRequest equivalent of `build_chat_request` (same fields and numbers)."""
    return pb.ChatStreamRequest.FromString(
        build_chat_request(model, prompt, system=system, provider=provider, **fields).SerializeToString()
    )


def channel_credentials(
    tls_ca: PathLike | None = None, tls_cert: PathLike | None = None, tls_key: PathLike | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files (for `grpc.secure_channel` / `grpc.aio.secure_channel`).

    Args:
        tls_ca: CA bundle the server's certificate must chain to; None: gRPC's default roots
            (`GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`, else the roots bundled with grpcio).
        tls_cert / tls_key: this client's certificate (chain) and unencrypted private key, for a
            gateway that requires client certificates (mTLS); both or neither.
    Raises:
        ValueError: only one of `tls_cert` / `tls_key` is given.
        OSError: a file cannot be read.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together (a client certificate needs its key)")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes() if tls_ca is not None else None,
        private_key=Path(tls_key).read_bytes() if tls_key is not None else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert is not None else None,
    )


def _credentials(
    tls: bool,
    tls_ca: PathLike | None,
    tls_cert: PathLike | None,
    tls_key: PathLike | None,
    credentials: grpc.ChannelCredentials | None,
) -> grpc.ChannelCredentials | None:
    """The channel's credentials, or None for a plaintext channel (no TLS option given)."""
    files = (tls_ca, tls_cert, tls_key)
    if credentials is not None:
        if any(f is not None for f in files):
            raise ValueError("give either credentials or tls_ca/tls_cert/tls_key, not both")
        return credentials
    if tls or any(f is not None for f in files):
        return channel_credentials(tls_ca, tls_cert, tls_key)
    return None


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class _OwnedCall:
    """A streaming call owned by one stream object: `cancel()` ends it and the iteration."""

    def __init__(self, call: Any) -> None:
        # `call`: the grpc (or grpc.aio) unary-stream call, which has `cancel()`.
        self._call = call
        self._closed = False

    def cancel(self) -> bool:
        """Cancels the call; True if it was still running. Iteration stops."""
        self._closed = True
        return bool(self._call.cancel())


class ChatStream(_OwnedCall, Iterator[pb.ChatStreamResponse]):
    """The events of one blocking `ChatStream` call, returned by `GatewayClient.chat_stream`.

    An iterator (the RPC starts when it is created) that owns the call and cancels it as soon as
    the consumer is done with it, so the gateway sees the cancellation and closes its upstream
    request at once:

    - `close()` / `cancel()`, or leaving a `with client.chat_stream(...) as stream:` block (also on
      an exception in the block);
    - an exception out of the iteration itself (e.g. `KeyboardInterrupt` while waiting for the next
      event); gateway errors are raised as `GatewayCallError`;
    - dropping the last reference: `for event in client.chat_stream(...): break` cancels at once
      under CPython's reference counting.

    Python tells an iterator nothing when a `for` loop over it ends early, so a stream still
    referenced after `break` (assigned to a variable) keeps running until it is closed: use the
    `with` form, or call `close()`. `cancel()` may be called from another thread; the loop that
    is waiting for the next event then ends quietly, as does any further iteration of a closed
    stream.
    """

    def __next__(self) -> pb.ChatStreamResponse:
        if self._closed:
            raise StopIteration
        try:
            return cast(pb.ChatStreamResponse, next(self._call))
        except StopIteration:
            self._closed = True
            raise
        except grpc.RpcError as error:
            if self._closed and error.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None  # cancelled here, by cancel()/close()
            self._closed = True
            raise GatewayCallError(error) from None
        except BaseException:
            self.cancel()
            raise

    def close(self) -> None:
        """Cancels the call if it is still running (as `cancel()`; the generator-style name)."""
        self.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()

    def __del__(self) -> None:
        if "_call" in self.__dict__:  # __init__ ran
            self._call.cancel()


class AsyncChatStream(_OwnedCall, AsyncIterator[pb.ChatStreamResponse]):
    """The events of one asyncio `ChatStream` call, returned by `AsyncGatewayClient.chat_stream`.

    An async iterator (the RPC starts when it is created, inside the running loop) that owns the
    call and cancels it as soon as the consumer is done with it, so the gateway sees the
    cancellation and closes its upstream request at once:

    - `await aclose()` / `cancel()`, or leaving an `async with client.chat_stream(...) as stream:`
      block (also on an exception in the block); `contextlib.aclosing` works too;
    - an exception out of the iteration itself (e.g. the consuming task being cancelled while it
      waits for the next event); gateway errors are raised as `GatewayCallError`;
    - dropping the last reference: `async for event in client.chat_stream(...): break` cancels at
      once under CPython's reference counting (no wait for the cyclic garbage collector, unlike an
      async generator over the grpc call).

    Python tells an async iterator nothing when an `async for` loop over it ends early, so a
    stream still referenced after `break` keeps running until it is closed: use the `async with`
    form, or `await stream.aclose()`. `cancel()` from another task ends that task's loop quietly
    (not with `CancelledError`), as does any further iteration of a closed stream.
    """

    def __init__(self, call: Any) -> None:
        # `call`: the grpc.aio unary-stream call (an async iterable of responses with `cancel()`).
        super().__init__(call)
        self._events: AsyncIterator[Any] | None = None

    async def __anext__(self) -> pb.ChatStreamResponse:
        if self._closed:
            raise StopAsyncIteration
        if self._events is None:
            self._events = self._call.__aiter__()
        try:
            return cast(pb.ChatStreamResponse, await anext(self._events))
        except StopAsyncIteration:
            self._closed = True
            raise
        except grpc.RpcError as error:
            self._closed = True
            raise GatewayCallError(error) from None
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError for a call cancelled locally: when that was our
            # cancel() (and this task is not itself being cancelled), the stream just ends.
            task = asyncio.current_task()
            if self._closed and not (task is not None and task.cancelling()):
                raise StopAsyncIteration from None
            self.cancel()
            raise
        except BaseException:
            self.cancel()
            raise

    async def aclose(self) -> None:
        """Cancels the call if it is still running (as `cancel()`; the async-generator name)."""
        self.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()

    def __del__(self) -> None:
        call = self.__dict__.get("_call")
        if call is not None and not call.done():  # as grpc.aio's own Call.__del__
            call.cancel()


class GatewayClient:
    """Blocking client. `timeout_s` is the deadline of each call, seconds.

    Plaintext by default; TLS when `tls` is true or any of `tls_ca` (CA bundle that the server
    certificate must chain to), `tls_cert` + `tls_key` (client certificate and key, for mTLS) or
    `credentials` (ready-made `grpc.ChannelCredentials`) is given; see `channel_credentials`. The
    target's host name must be one the server's certificate names. `channel`: use this channel
    instead (not closed by `close`; the TLS options do not apply to it).

    Raises:
        ValueError: `channel` together with TLS options, `credentials` together with TLS files,
            or only one of `tls_cert` / `tls_key`.
        OSError: a TLS file cannot be read.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        channel: grpc.Channel | None = None,
        tls: bool = False,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        secure = _credentials(tls, tls_ca, tls_cert, tls_key, credentials)
        if channel is not None and secure is not None:
            raise ValueError("TLS options apply to the client's own channel; configure the given channel instead")
        self._owns_channel = channel is None
        if channel is None:
            channel = grpc.insecure_channel(target) if secure is None else grpc.secure_channel(target, secure)
        self._channel = channel
        self._stub = pb_grpc.LLMGatewayServiceStub(self._channel)
        self._metadata = _metadata(api_key)
        self._timeout_s = timeout_s

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel if this client created it."""
        if self._owns_channel:
            self._channel.close()

    def chat(self, model: str, prompt: str | Sequence[pb.Message], **options: Any) -> pb.ChatResponse:
        """One chat call (options as for `build_chat_request`). Raises GatewayCallError."""
        try:
            return cast(
                pb.ChatResponse,
                self._stub.Chat(
                    build_chat_request(model, prompt, **options), timeout=self._timeout_s, metadata=self._metadata
                ),
            )
        except grpc.RpcError as error:
            raise GatewayCallError(error) from None

    def chat_stream(self, model: str, prompt: str | Sequence[pb.Message], **options: Any) -> ChatStream:
        """Starts a stream (options as for `build_chat_request`) and returns its events as a
        `ChatStream`; the last event of a successful stream is `final`. Iterating raises
        GatewayCallError.

        Leaving early cancels the RPC (so the gateway stops the upstream request) as soon as the
        stream is closed: `for event in client.chat_stream(...): break` does it at once when
        nothing else references the stream; a stream kept in a variable is closed by
        `with client.chat_stream(...) as stream:` (on exit, exceptions included), `stream.close()`
        or `stream.cancel()` (see `ChatStream`).
        """
        return ChatStream(
            self._stub.ChatStream(
                build_chat_stream_request(model, prompt, **options), timeout=self._timeout_s, metadata=self._metadata
            )
        )

    def embed(self, model: str, inputs: Sequence[str], dimensions: int | None = None) -> pb.EmbedResponse:
        """Embeddings, one vector per input. Raises GatewayCallError."""
        request = pb.EmbedRequest(model=model, inputs=list(inputs))
        if dimensions is not None:
            request.dimensions = dimensions
        try:
            return cast(pb.EmbedResponse, self._stub.Embed(request, timeout=self._timeout_s, metadata=self._metadata))
        except grpc.RpcError as error:
            raise GatewayCallError(error) from None

    def list_models(self, provider: str = "", capability: int = 0) -> list[pb.Model]:
        """Every model matching the filters (follows page tokens). Raises GatewayCallError."""
        models: list[pb.Model] = []
        token = ""
        try:
            while True:
                page = self._stub.ListModels(
                    pb.ListModelsRequest(provider=provider, capability=capability, page_size=1000, page_token=token),  # type: ignore[arg-type]
                    timeout=self._timeout_s,
                    metadata=self._metadata,
                )
                models.extend(page.models)
                token = page.next_page_token
                if not token:
                    return models
        except grpc.RpcError as error:
            raise GatewayCallError(error) from None


class AsyncGatewayClient:
    """asyncio client (grpc.aio). `timeout_s` is the deadline of each call, seconds.

    TLS options as for `GatewayClient`: `tls`, `tls_ca`, `tls_cert` + `tls_key`, or `credentials`.

    Raises:
        ValueError: `credentials` together with TLS files, or only one of `tls_cert` / `tls_key`.
        OSError: a TLS file cannot be read.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        tls: bool = False,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        secure = _credentials(tls, tls_ca, tls_cert, tls_key, credentials)
        self._channel = grpc.aio.insecure_channel(target) if secure is None else grpc.aio.secure_channel(target, secure)
        self._stub = pb_grpc.LLMGatewayServiceStub(self._channel)
        self._metadata = _metadata(api_key)
        self._timeout_s = timeout_s

    async def __aenter__(self) -> AsyncGatewayClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def chat(self, model: str, prompt: str | Sequence[pb.Message], **options: Any) -> pb.ChatResponse:
        """One chat call. Raises GatewayCallError."""
        try:
            reply = await self._stub.Chat(
                build_chat_request(model, prompt, **options), timeout=self._timeout_s, metadata=self._metadata
            )
            return cast(pb.ChatResponse, reply)
        except grpc.RpcError as error:
            raise GatewayCallError(error) from None

    def chat_stream(self, model: str, prompt: str | Sequence[pb.Message], **options: Any) -> AsyncChatStream:
        """Starts a stream (call it inside the running loop) and returns its events as an
        `AsyncChatStream`; the last event of a successful stream is `final`. Iterating raises
        GatewayCallError.

        Leaving early cancels the RPC (so the gateway stops the upstream request) as soon as the
        stream is closed: `async for event in client.chat_stream(...): break` does it at once when
        nothing else references the stream; a stream kept in a variable is closed by
        `async with client.chat_stream(...) as stream:` (on exit, exceptions included),
        `await stream.aclose()` or `stream.cancel()`; a consuming task cancelled mid-stream
        cancels it too (see `AsyncChatStream`).
        """
        return AsyncChatStream(
            self._stub.ChatStream(
                build_chat_stream_request(model, prompt, **options), timeout=self._timeout_s, metadata=self._metadata
            )
        )
