"""The typed call outcome, seen from outside: failed calls keep the deployment they were routed to
in metrics and logs, a client deadline is DEADLINE_EXCEEDED (not CANCELLED), and the default retry
policy is the official SDKs' (three attempts: two retries)."""

from __future__ import annotations

import asyncio

import grpc

from llm_gateway_server.config import RetrySettings

from .conftest import OPENAI_TEST_KEY, Gateway, GatewayFactory, chat, expect_error, free_port
from .emulators.openai_server import OpenAIEmulator


def _requests(gateway: Gateway, **labels: str) -> float:
    metrics = gateway.running.metrics
    assert metrics is not None
    return metrics.registry.get_sample_value("llm_gateway_requests_total", labels) or 0.0


async def _counted(gateway: Gateway, **labels: str) -> float:
    """The request count once the call's log line and metrics are written (the interceptor
    finishes a moment after the client has its status)."""
    for _ in range(100):
        if _requests(gateway, **labels):
            break
        await asyncio.sleep(0.01)
    return _requests(gateway, **labels)


async def test_failed_calls_keep_their_deployment_in_metrics(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator
) -> None:
    env = {"OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": openai_upstream.base_url}
    gateway = await make_gateway(env, metrics_port=free_port())
    await expect_error(gateway.stub.Chat(chat("status-400")))
    # passthrough model names chosen by clients are bounded to "other" (no series per name)
    labels = {"method": "Chat", "model": "other", "provider": "openai", "code": "INVALID_ARGUMENT"}
    assert await _counted(gateway, **labels) == 1
    # Before: model "unresolved", provider "none".
    assert _requests(gateway, method="Chat", model="unresolved", provider="none", code="INVALID_ARGUMENT") == 0


async def test_a_client_deadline_is_deadline_exceeded_with_its_provider(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator
) -> None:
    env = {"OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": openai_upstream.base_url}
    gateway = await make_gateway(env, metrics_port=free_port())
    try:
        await gateway.stub.Chat(chat("hang"), timeout=0.3)
    except grpc.aio.AioRpcError as error:
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    labels = {"method": "Chat", "model": "other", "provider": "openai"}
    assert await _counted(gateway, **labels, code="DEADLINE_EXCEEDED") == 1
    assert _requests(gateway, **labels, code="CANCELLED") == 0


def test_default_retries_match_the_sdks() -> None:
    assert RetrySettings().max_attempts == 3  # openai/anthropic/groq SDKs: max_retries=2


async def test_two_retries_by_default(make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator) -> None:
    env = {"OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": openai_upstream.base_url}
    gateway = await make_gateway(env, retry={"base_delay_s": 0.0, "max_delay_s": 0.0})
    reply = await gateway.stub.Chat(chat("flaky-503-2"))
    assert [a.error_reason for a in reply.attempts] == ["PROVIDER_UNAVAILABLE", "PROVIDER_UNAVAILABLE", ""]
