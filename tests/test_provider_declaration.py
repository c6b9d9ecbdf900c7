"""Declarative providers: a provider kind declared in one module (`tests/plugins/echo_provider.py`)
comes up from its environment variable, is accepted as a config `kind`, routes chat, streams and
embeddings through the real server, and names its own configuration hint."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway_server.config import ConfigError, load_settings
from llm_gateway_server.providers import registry

from .conftest import GatewayFactory, chat, chat_stream, collect, expect_error
from .plugins import echo_provider


@pytest.fixture
def echo_kind() -> Iterator[None]:
    registry.register(echo_provider.SPEC)
    yield
    registry.unregister("echo")


def test_builtin_kinds_are_the_adapter_modules_declarations() -> None:
    assert {"openai", "anthropic", "groq", "ollama"} <= set(registry.specs())
    assert registry.specs()["anthropic"].discovery_env == ("ANTHROPIC_API_KEY",)
    assert registry.specs()["openai"].discovery_env == ("OPENAI_API_KEY", "OPENAI_BASE_URL")
    assert registry.specs()["ollama"].discovery_env == ("OLLAMA_HOST",)


def test_unknown_kind_is_a_config_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown provider kind 'echo'; known: .*openai"):
        load_settings(environ={}, overrides={"providers": [{"name": "e", "kind": "echo"}]})


@pytest.mark.usefixtures("echo_kind")
def test_a_declared_kind_comes_up_from_its_environment_variable() -> None:
    settings = load_settings(environ={"ECHO_API_KEY": "ek-1"})
    assert [(p.name, p.kind, p.api_key_env) for p in settings.providers] == [("echo", "echo", "ECHO_API_KEY")]
    named = load_settings(environ={}, overrides={"providers": [{"name": "e", "kind": "echo"}]})
    with pytest.raises(ConfigError, match=r"provider 'e': no API key \(set ECHO_API_KEY\)"):
        registry.build_registry(named.providers, {})
    # A named provider of the kind reads the kind's standard variable, as its SDK would.
    assert registry.provider_config(named.providers[0], {"ECHO_API_KEY": "ek-2"}).api_key == "ek-2"


@pytest.mark.usefixtures("echo_kind")
async def test_a_declared_kind_serves_through_the_real_server(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(
        {"ECHO_API_KEY": "ek-1"},
        models=[{"id": "echo-1", "provider": "echo", "capabilities": ["chat", "streaming", "embeddings"]}],
    )
    reply = await gateway.stub.Chat(chat("echo-1", "hello there"))
    assert (reply.provider, reply.model, reply.message.content[0].text) == ("echo", "echo-1", "echo(ek): hello there")
    prefixed = await gateway.stub.Chat(chat("echo/anything"))
    assert prefixed.model == "anything"
    events = await collect(gateway.stub.ChatStream(chat_stream("echo-1", "a b c")))
    assert "".join(e.delta.text for e in events[:-1]) == "abc"
    assert events[-1].final.usage.output_tokens == 4
    embedded = await gateway.stub.Embed(pb.EmbedRequest(model="echo-1", inputs=["abc", "de"]))
    assert [list(v.values) for v in embedded.embeddings] == [[3.0], [2.0]]
    listed = await gateway.stub.ListModels(pb.ListModelsRequest(provider="echo"))
    assert {m.id for m in listed.models} == {"echo-1", "echo/echo-live"}


@pytest.mark.usefixtures("echo_kind")
async def test_an_unconfigured_declared_kind_names_its_hint(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway({}, models=[{"id": "echo-1", "provider": "echo"}])
    error = await expect_error(gateway.stub.Chat(chat("echo-1")))
    assert (error.code, error.info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_NOT_CONFIGURED")
    assert "set ECHO_API_KEY" in error.message
