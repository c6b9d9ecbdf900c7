"""Exact-match response cache for Chat, ChatStream and Embed.

Key: SHA-256 of the method, the caller's owner (no cross-tenant hits) and the request serialized
deterministically without its cache options, metadata and end-user id (they do not change the
answer). Per-request modes: default (read + write), bypass, refresh (write only), read-only.
A stream hit is replayed as a stream; a stream fills the cache only once its final event passed.
Hits say so in `CacheInfo` (hit, age in ms). A backend failure is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from google.protobuf import message as pb_message

from llm_gateway.v1 import llm_gateway_pb2 as pb

from ..config import CacheSettings
from ..domain import Cost, Usage
from ..state.base import BackendUnavailableError, CacheBackend
from ..telemetry.metrics import Metrics
from ..transport.call_record import current_call
from .base import GatewayInterceptor, StreamBehavior, UnaryBehavior, method_name

log = structlog.get_logger(__name__)
_RESPONSES: dict[str, type[pb_message.Message]] = {"Chat": pb.ChatResponse, "Embed": pb.EmbedResponse}
_UNARY, _STREAM = b"U", b"S"
_HEADER = struct.Struct(">cQ")  # kind, stored-at (unix ms)
_LENGTH = struct.Struct(">I")


def cache_key(method: str, owner: str, request: Any) -> str:
    """The cache key of `request` for `owner` (see module docstring)."""
    normalized = type(request)()
    normalized.CopyFrom(request)
    for name in ("cache", "metadata", "end_user_id"):
        normalized.ClearField(name)
    digest = hashlib.sha256()
    digest.update(method.encode())
    digest.update(b"\0" + owner.encode() + b"\0")
    digest.update(normalized.SerializeToString(deterministic=True))
    tenant = hashlib.sha256(owner.encode()).hexdigest()[:16]
    return f"llmgw:cache:{{{tenant}}}:{digest.hexdigest()}"


def _modes(request: Any) -> tuple[bool, bool]:
    """(read, write) for the request's cache mode."""
    mode = request.cache.mode
    if mode == pb.CACHE_MODE_BYPASS:
        return False, False
    if mode == pb.CACHE_MODE_REFRESH:
        return False, True
    if mode == pb.CACHE_MODE_READ_ONLY:
        return True, False
    return True, True


def _now_ms() -> int:
    return int(time.time() * 1000)


def _note_hit(model: str, provider: str, usage: pb.Usage, cost: pb.Cost) -> None:
    """Fills the call's outcome from a cached answer: the deployment that once gave it, its
    tokens and, as `saved_cost`, what it cost then (nothing was spent: no cost, no attempts)."""
    record = current_call.get()
    if record is None:
        return
    outcome = record.outcome
    outcome.resolve(provider, model)
    outcome.answered_model = model
    outcome.usage = Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        estimated=usage.estimated,
    )
    outcome.saved_cost = Cost(input_usd=cost.input_usd, output_usd=cost.output_usd, priced=cost.priced)
    outcome.cache_hit = outcome.completed = True


class CacheInterceptor(GatewayInterceptor):
    """Serves and fills the response cache (see module docstring)."""

    def __init__(self, backend: CacheBackend, settings: CacheSettings, metrics: Metrics | None) -> None:
        super().__init__()
        self._backend = backend
        self._settings = settings
        self._metrics = metrics

    def _count(self, method: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.child(self._metrics.cache, method, result).inc()

    def _ttl(self, request: Any) -> int:
        return request.cache.ttl_seconds if request.cache.HasField("ttl_seconds") else self._settings.ttl_s

    async def _get(self, method: str, key: str) -> bytes | None:
        try:
            return await self._backend.get(key)
        except BackendUnavailableError as exc:
            log.warning("cache_backend_unavailable", error=str(exc))
            self._count(method, "error")
            return None

    async def _put(self, method: str, key: str, value: bytes, ttl_s: int) -> None:
        try:
            await self._backend.set(key, value, ttl_s)
        except BackendUnavailableError as exc:
            log.warning("cache_backend_unavailable", error=str(exc))
            self._count(method, "error")

    @staticmethod
    def _key(method: str, request: Any) -> str:
        record = current_call.get()
        return cache_key(method, (record.owner if record else "") or "anonymous", request)

    async def unary(
        self, inner: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        name = method_name(method)
        response_type = _RESPONSES.get(name)
        if response_type is None:
            return await inner(request, context)
        read, write = _modes(request)
        if not read and not write:
            self._count(name, "bypass")
            return await inner(request, context)
        key = self._key(name, request)
        if read:
            stored = await self._get(name, key)
            if stored is not None and stored[:1] == _UNARY:
                _, stored_at = _HEADER.unpack_from(stored)
                response = response_type.FromString(stored[_HEADER.size :])
                record = current_call.get()
                response.id = record.request_id if record else response.id  # type: ignore[attr-defined]
                response.cache.hit, response.cache.age_ms = True, max(_now_ms() - stored_at, 0)  # type: ignore[attr-defined]
                _note_hit(response.model, response.provider, response.usage, response.cost)  # type: ignore[attr-defined]
                self._count(name, "hit")
                return response
            self._count(name, "miss")
        response = await inner(request, context)
        if write:
            await self._put(
                name, key, _HEADER.pack(_UNARY, _now_ms()) + response.SerializeToString(), self._ttl(request)
            )
        return response

    async def stream(
        self, inner: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        name = method_name(method)
        read, write = _modes(request)
        if not read and not write:
            self._count(name, "bypass")
            async for message in inner(request, context):
                yield message
            return
        key = self._key(name, request)
        if read:
            stored = await self._get(name, key)
            if stored is not None and stored[:1] == _STREAM:
                self._count(name, "hit")
                async for message in self._replay(stored):
                    yield message
                return
            self._count(name, "miss")
        events: list[bytes] = []
        async for message in inner(request, context):
            if write:
                events.append(message.SerializeToString())
            yield message
        record = current_call.get()
        if write and record is not None and record.outcome.completed:
            body = b"".join(_LENGTH.pack(len(e)) + e for e in events)
            await self._put(name, key, _HEADER.pack(_STREAM, _now_ms()) + body, self._ttl(request))

    @staticmethod
    async def _replay(stored: bytes) -> AsyncIterator[pb.ChatStreamResponse]:
        _, stored_at = _HEADER.unpack_from(stored)
        record = current_call.get()
        offset = _HEADER.size
        while offset < len(stored):
            (length,) = _LENGTH.unpack_from(stored, offset)
            offset += _LENGTH.size
            message = pb.ChatStreamResponse.FromString(stored[offset : offset + length])
            offset += length
            if record is not None:
                message.id = record.request_id
            if message.WhichOneof("event") == "final":
                message.final.cache.hit, message.final.cache.age_ms = True, max(_now_ms() - stored_at, 0)
                _note_hit(message.model, message.provider, message.final.usage, message.final.cost)
            yield message
