"""Sync and asyncio clients wrapping `llm_gateway.v1` stubs, with rich error decoding."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


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


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class GatewayClient:
    """Blocking client. `timeout_s` is the deadline of each call, seconds."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._channel = channel or grpc.insecure_channel(target)
        self._owns_channel = channel is None
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

    def chat_stream(
        self, model: str, prompt: str | Sequence[pb.Message], **options: Any
    ) -> Iterator[pb.ChatStreamResponse]:
        """Streams events; the last one of a successful stream is `final`. Raises GatewayCallError."""
        try:
            yield from self._stub.ChatStream(
                build_chat_stream_request(model, prompt, **options), timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise GatewayCallError(error) from None

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
    """asyncio client (grpc.aio). `timeout_s` is the deadline of each call, seconds."""

    def __init__(self, target: str = DEFAULT_TARGET, *, api_key: str | None = None, timeout_s: float = 120.0) -> None:
        self._channel = grpc.aio.insecure_channel(target)
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

    async def chat_stream(
        self, model: str, prompt: str | Sequence[pb.Message], **options: Any
    ) -> AsyncIterator[pb.ChatStreamResponse]:
        """Streams events; the last one of a successful stream is `final`. Raises GatewayCallError."""
        call = self._stub.ChatStream(
            build_chat_stream_request(model, prompt, **options), timeout=self._timeout_s, metadata=self._metadata
        )
        try:
            async for event in call:
                yield event
        except grpc.RpcError as error:
            raise GatewayCallError(error) from None
