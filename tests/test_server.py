"""The server process: health, reflection, SIGTERM drain, the CLI and configuration errors."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc
from llm_gateway_server.config import ConfigError, load_settings
from llm_gateway_server.providers.registry import provider_config

from .conftest import FAST_RECONNECT, GATEWAY_PROCESSES, OPENAI_TEST_KEY, Gateway, GatewayFactory, chat, free_port
from .emulators.openai_server import OpenAIEmulator

SERVICE = "llm_gateway.v1.LLMGatewayService"


async def test_health_serving_overall_and_per_service(gateway: Gateway) -> None:
    health = health_pb2_grpc.HealthStub(gateway.channel)
    for service in ("", SERVICE):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service="unknown.Service"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_services_and_resolves_contract(gateway: Gateway) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(gateway.channel)

    async def ask(request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
        call = stub.ServerReflectionInfo()
        await call.write(request)
        await call.done_writing()
        return await call.read()

    listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    symbol = await ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
    assert symbol.file_descriptor_response.file_descriptor_proto


async def _reflect(channel: grpc.aio.Channel, method: str, request: reflection_pb2.ServerReflectionRequest) -> Any:
    """One reflection exchange on `method` (v1 or v1alpha: the same messages on the wire)."""
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )()
    await call.write(request)
    await call.done_writing()
    return await call.read()


async def test_reflection_v1_as_grpc_js_asks_for_it(gateway: Gateway) -> None:
    """grpc-js reflection clients use `grpc.reflection.v1` (grpcio-reflection ships v1alpha only)."""
    v1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
    listed = await _reflect(gateway.channel, v1, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
    symbol = await _reflect(gateway.channel, v1, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
    assert symbol.file_descriptor_response.file_descriptor_proto
    described = await _reflect(
        gateway.channel,
        v1,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    )
    assert described.file_descriptor_response.file_descriptor_proto


async def test_reflection_can_be_turned_off(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway({}, reflection=False)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _reflect(
            gateway.channel,
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            reflection_pb2.ServerReflectionRequest(list_services=""),
        )
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    await gateway.stub.ListModels(pb.ListModelsRequest(page_size=1))  # the service itself still serves


async def test_drain_sets_not_serving_and_finishes_in_flight_calls(
    gateway: Gateway, openai_upstream: OpenAIEmulator
) -> None:
    health = health_pb2_grpc.HealthStub(gateway.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    in_flight = asyncio.ensure_future(gateway.stub.Chat(chat("m", "still answered")))
    await asyncio.sleep(0.05)
    stopping = asyncio.ensure_future(gateway.running.stop())
    update = await asyncio.wait_for(watch.read(), 5)
    assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
    response = await asyncio.wait_for(in_flight, 5)
    assert response.message.content[0].text == "echo: still answered"
    await stopping


def _gateway_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OLLAMA_", "LLM_GATEWAY_"))}
    return {**env, "LLM_GATEWAY_METRICS_PORT": "0", **extra}


@GATEWAY_PROCESSES
async def test_cli_serves_from_env_and_drains_on_sigterm(openai_upstream: OpenAIEmulator) -> None:
    port = free_port()
    process = subprocess.Popen(  # noqa: ASYNC220 - a real process, so SIGTERM reaches the real signal handler
        [sys.executable, "-m", "llm_gateway_server", "serve", "--port", str(port)],
        env=_gateway_env({"OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": openai_upstream.base_url}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FAST_RECONNECT) as channel:
            await asyncio.wait_for(channel.channel_ready(), 20)
            reply = await pb_grpc.LLMGatewayServiceStub(channel).Chat(chat("m", "from a process"))
            assert reply.message.content[0].text == "echo: from a process"
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(process.communicate, timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert '"event": "server_started"' in output and '"event": "server_stopped"' in output
    assert OPENAI_TEST_KEY not in output


@GATEWAY_PROCESSES
def test_cli_reports_invalid_config_clearly(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("port: not-a-number\nproviders:\n  - name: Bad Name\n    kind: azure\n")
    result = subprocess.run(
        [sys.executable, "-m", "llm_gateway_server", "serve", "--config", str(config)],
        env=_gateway_env({}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "port" in result.stderr and "providers.0.name" in result.stderr and "providers.0.kind" in result.stderr


def test_settings_precedence_and_named_compatible_provider(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "port: 6000\nlog_level: debug\nproviders:\n"
        "  - {name: llamacpp, kind: openai, base_url: 'http://127.0.0.1:8080/v1'}\n"
        "models:\n  - {id: my-model, provider: llamacpp, provider_model: gemma}\n"
    )
    settings = load_settings(
        config, environ={"LLM_GATEWAY_PORT": "7000", "OPENAI_API_KEY": "k"}, overrides={"host": "0.0.0.0"}
    )
    assert (settings.host, settings.port, settings.log_level) == ("0.0.0.0", 7000, "debug")
    assert [p.name for p in settings.providers] == ["openai", "llamacpp"]
    configs = [provider_config(p, {"OPENAI_API_KEY": "k"}) for p in settings.providers]
    assert configs[1].passthrough and not configs[0].passthrough
    assert settings.models[0].provider_model == "gemma"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("[1, 2]", "top level must be a mapping"), ("port: [", "invalid YAML"), ("bogus_setting: 1", "bogus_setting")],
)
def test_config_errors(tmp_path: Path, text: str, fragment: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={})
    assert fragment in str(caught.value)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(Path("/nonexistent/gateway.yaml"), environ={})


async def test_named_openai_compatible_provider_from_config(
    make_gateway: object, openai_upstream: OpenAIEmulator, tmp_path: Path
) -> None:
    gateway = await make_gateway(  # type: ignore[operator]
        {},
        providers=[{"name": "local-llm", "kind": "openai", "base_url": openai_upstream.base_url}],
        models=[
            {
                "id": "house-model",
                "provider": "local-llm",
                "provider_model": "emulated-model",
                "pricing": {"input_per_million_usd": 1.0, "output_per_million_usd": 2.0},
            }
        ],
    )
    response = await gateway.stub.Chat(chat("house-model"))
    assert response.provider == "local-llm" and response.model == "emulated-model"
    assert response.cost.priced and response.cost.total_usd == pytest.approx((11 * 1.0 + 7 * 2.0) / 1e6)
    sent = openai_upstream.calls("/chat/completions")[-1]
    assert sent.body["model"] == "emulated-model"
    assert sent.headers["Authorization"] == "Bearer no-key-configured"
    listed = await gateway.stub.GetModel(pb.GetModelRequest(name="models/house-model"))
    assert listed.model.source == pb.MODEL_SOURCE_CONFIG
