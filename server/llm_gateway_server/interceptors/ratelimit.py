"""Rate limits per API key (or per client address without auth): requests per minute, tokens per
minute (an estimate of input + maximum output is reserved before the call and reconciled with the
real usage after it), and concurrent streams.

Refusals are RESOURCE_EXHAUSTED / RATE_LIMIT_EXCEEDED with `RetryInfo` (until the window resets)
and `QuotaFailure`; allowed calls carry `x-ratelimit-*` headers: trailing metadata of a unary
call, initial metadata of a stream (before its first message). When the backend is
unreachable the call goes through (fail-open, default) or is refused UNAVAILABLE /
RATE_LIMITER_UNAVAILABLE (fail-closed); either way it is logged and counted, never a hang.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, NoReturn

import grpc
import structlog

from llm_gateway.v1 import llm_gateway_pb2 as pb

from ..config import ApiKeySettings, RateLimitSettings
from ..errors import rate_limit_exceeded, rate_limiter_unavailable
from ..estimates import TOKENS_PER_MESSAGE, estimate_tokens
from ..state.base import BackendUnavailableError, RateLimitBackend, Reservation
from ..telemetry.metrics import Metrics
from ..transport.call_record import CallRecord, current_call
from ..transport.status import abort
from .base import GatewayInterceptor, StreamBehavior, UnaryBehavior

log = structlog.get_logger(__name__)
_LIMIT_UNITS = {"requests": "requests per minute", "tokens": "tokens per minute", "streams": "concurrent streams"}


def peer_scope(peer: str) -> str:
    """`ipv4:127.0.0.1:5000` → `peer:127.0.0.1` (the client address without its port)."""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else peer
    return f"peer:{host}"


def estimate_request_tokens(request: object, output_reserve: int) -> int:
    """Tokens a request may use: its text at ~4 chars/token plus framing, plus the output limit
    (or `output_reserve` when it sets none). Embed: the inputs only. Other calls: 0."""
    if isinstance(request, (pb.ChatRequest, pb.ChatStreamRequest)):
        text = sum(len(p.text) for m in request.messages for p in m.content)
        generation = request.generation
        output = generation.max_output_tokens if generation.HasField("max_output_tokens") else output_reserve
        return estimate_tokens(text) + TOKENS_PER_MESSAGE * len(request.messages) + max(output, 0)
    if isinstance(request, pb.EmbedRequest):
        return sum(estimate_tokens(len(t)) for t in request.inputs)
    return 0


class RateLimitInterceptor(GatewayInterceptor):
    """Enforces per-scope limits with a `RateLimitBackend` (in memory or Redis).

    Args:
        backend: the counters.
        settings: defaults and failure policy.
        keys: configured API keys (their own limits override the defaults).
        metrics: rejections and backend failures are counted here.
        stream_max_age_s: how long an open-stream entry may live (bounds leaks from crashes).
    """

    def __init__(
        self,
        backend: RateLimitBackend,
        settings: RateLimitSettings,
        keys: Sequence[ApiKeySettings],
        metrics: Metrics | None,
        stream_max_age_s: float,
    ) -> None:
        super().__init__()
        self._backend = backend
        self._settings = settings
        self._keys = {k.id: k for k in keys}
        self._metrics = metrics
        self._stream_max_age_s = stream_max_age_s

    def _limits(self, record: CallRecord) -> tuple[int | None, int | None, int | None]:
        key = self._keys.get(record.key_id)
        s = self._settings
        rpm = key.rpm if key and key.rpm is not None else s.default_rpm
        tpm = key.tpm if key and key.tpm is not None else s.default_tpm
        streams = (
            key.max_concurrent_streams
            if key and key.max_concurrent_streams is not None
            else s.default_max_concurrent_streams
        )
        return rpm, tpm, streams

    async def _backend_failed(
        self, context: grpc.aio.ServicerContext[Any, Any], record: CallRecord, exc: BackendUnavailableError
    ) -> None:
        action = "fail_open" if self._settings.fail_open else "fail_closed"
        log.warning("rate_limit_backend_unavailable", action=action, error=str(exc), request_id=record.request_id)
        if self._metrics is not None:
            self._metrics.backend_errors.labels("rate_limit", action).inc()
        if not self._settings.fail_open:
            await abort(context, rate_limiter_unavailable(), record.request_id)

    async def _reject(
        self, context: grpc.aio.ServicerContext[Any, Any], record: CallRecord, limit: str, value: int, reset_s: float
    ) -> NoReturn:
        if self._metrics is not None:
            self._metrics.rate_limited.labels(limit).inc()
        what = _LIMIT_UNITS[limit]
        await abort(context, rate_limit_exceeded(record.scope, limit, value, what, reset_s), record.request_id)

    async def _reserve(
        self, context: grpc.aio.ServicerContext[Any, Any], request: Any
    ) -> tuple[CallRecord, Reservation | None, tuple[tuple[str, str], ...]]:
        """Takes the call's requests and tokens from its scope's windows.

        Returns:
            The call record, the reservation (None without limits or when the backend failed
            open) and the `x-ratelimit-*` headers to send with the answer.
        Raises:
            (through `context.abort`) RESOURCE_EXHAUSTED over a limit; UNAVAILABLE when the
            backend failed closed.
        """
        record = current_call.get()
        assert record is not None, "the observability interceptor runs first"
        if not record.scope:
            record.scope = peer_scope(record.peer)
        rpm, tpm, _ = self._limits(record)
        if rpm is None and tpm is None:
            return record, None, ()
        tokens = estimate_request_tokens(request, self._settings.output_tokens_reserve)
        try:
            reservation = await self._backend.acquire(record.scope, rpm, tpm, tokens)
        except BackendUnavailableError as exc:
            await self._backend_failed(context, record, exc)
            return record, None, ()
        if not reservation.allowed:
            limit_value = rpm if reservation.exceeded == "requests" else tpm
            assert limit_value is not None
            await self._reject(context, record, reservation.exceeded, limit_value, reservation.reset_s)
        headers: list[tuple[str, str]] = []
        if rpm is not None:
            headers += [
                ("x-ratelimit-limit-requests", str(rpm)),
                ("x-ratelimit-remaining-requests", str(max(rpm - reservation.requests, 0))),
                ("x-ratelimit-reset-requests", f"{reservation.reset_s:.3f}s"),
            ]
        if tpm is not None:
            headers += [
                ("x-ratelimit-limit-tokens", str(tpm)),
                ("x-ratelimit-remaining-tokens", str(max(tpm - reservation.tokens, 0))),
                ("x-ratelimit-reset-tokens", f"{reservation.reset_s:.3f}s"),
            ]
        return record, reservation, tuple(headers)

    async def _reconcile(self, record: CallRecord, reservation: Reservation | None) -> None:
        """Replaces the reservation by the call's real tokens (0 when it produced no usage)."""
        if reservation is None:
            return
        try:
            await self._backend.reconcile(record.scope, reservation, record.outcome.total_tokens)
        except BackendUnavailableError as exc:
            log.warning("rate_limit_reconcile_failed", error=str(exc), request_id=record.request_id)
            if self._metrics is not None:
                self._metrics.backend_errors.labels("rate_limit", "reconcile_skipped").inc()

    async def unary(
        self, inner: UnaryBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        record, reservation, headers = await self._reserve(context, request)
        try:
            response = await inner(request, context)
            if headers:  # trailers travel with the status: no extra HTTP/2 frame (bench/NOTES.md)
                context.set_trailing_metadata((*(context.trailing_metadata() or ()), *headers))
            return response
        finally:
            await self._reconcile(record, reservation)

    async def stream(
        self, inner: StreamBehavior, request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        record, reservation, headers = await self._reserve(context, request)
        if headers:  # before the first message, so a client can read them before any content
            await context.send_initial_metadata(headers)
        _, _, max_streams = self._limits(record)
        registered = False
        if max_streams is not None:
            try:
                registered = await self._backend.open_stream(
                    record.scope, record.request_id, max_streams, self._stream_max_age_s
                )
                if not registered:
                    await self._reconcile(record, reservation)
                    await self._reject(context, record, "streams", max_streams, 1.0)
            except BackendUnavailableError as exc:
                await self._backend_failed(context, record, exc)
        try:
            async for message in inner(request, context):
                yield message
        finally:
            await self._reconcile(record, reservation)
            if registered:
                try:
                    await self._backend.close_stream(record.scope, record.request_id)
                except BackendUnavailableError as exc:
                    log.warning("rate_limit_stream_release_failed", error=str(exc), request_id=record.request_id)
