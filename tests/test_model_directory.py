"""The model directory (ListModels / GetModel): named OpenAI-compatible providers, Ollama's default
tag, fetching only the live lists a request needs, and one in-flight fetch per provider.

The first half drives the real server through generated stubs against the loopback emulators and
counts their recorded `/v1/models`, `/api/tags` and `/api/show` requests; the second half drives
`ModelDirectory` directly over in-process fake providers (no gRPC, no HTTP), which pins the
single-flight and caching behaviour exactly.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway_server.domain import Capability, LiveModel, ModelSource
from llm_gateway_server.errors import GatewayError
from llm_gateway_server.providers import errors as provider_errors
from llm_gateway_server.providers.base import Provider
from llm_gateway_server.providers.registry import ProviderRegistry
from llm_gateway_server.routing.catalog import load_catalog
from llm_gateway_server.routing.directory import ModelDirectory

from .conftest import OPENAI_TEST_KEY, Gateway, GatewayFactory, chat, expect_error
from .emulators.ollama_server import OllamaEmulator
from .emulators.openai_server import OpenAIEmulator

VLLM_MODELS = ("gpt-4o-mini", "qwen2.5-7b-instruct")
OLLAMA_MODELS = ("llama3.2:latest", "nomic-embed-text:latest", "tinyllama:latest")


# --------------------------------------------------------------------------- through the server


@pytest.fixture
async def vllm_upstream() -> AsyncIterator[OpenAIEmulator]:
    """A second OpenAI-compatible server; it lists `gpt-4o-mini`, which the catalog has for openai."""
    emulator = OpenAIEmulator(models=VLLM_MODELS)
    await emulator.start()
    yield emulator
    await emulator.stop()


@pytest.fixture
async def three(
    make_gateway: GatewayFactory,
    openai_upstream: OpenAIEmulator,
    ollama_upstream: OllamaEmulator,
    vllm_upstream: OpenAIEmulator,
) -> Gateway:
    """Providers `openai` and `ollama` (standard variables) and `vllm` (YAML, kind openai)."""
    return await make_gateway(
        {
            "OPENAI_API_KEY": OPENAI_TEST_KEY,
            "OPENAI_BASE_URL": openai_upstream.base_url,
            "OLLAMA_HOST": ollama_upstream.host,
        },
        providers=[{"name": "vllm", "kind": "openai", "base_url": vllm_upstream.base_url}],
    )


def fetches(openai: OpenAIEmulator, vllm: OpenAIEmulator, ollama: OllamaEmulator) -> dict[str, int]:
    """Live-list requests each emulator has seen so far."""
    return {
        "openai": len(openai.calls("/models")),
        "vllm": len(vllm.calls("/models")),
        "ollama_tags": len(ollama.calls("/api/tags")),
        "ollama_show": len(ollama.calls("/api/show")),
    }


NONE = {"openai": 0, "vllm": 0, "ollama_tags": 0, "ollama_show": 0}


async def until(condition: Callable[[], object], timeout_s: float = 5.0) -> None:
    """Polls `condition()` every 10 ms until it is true (fails after `timeout_s` seconds)."""
    async with asyncio.timeout(timeout_s):
        # polled: the emulators record requests in a plain list, with no event to wait on
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_named_provider_lists_every_live_model(three: Gateway) -> None:
    page = await three.stub.ListModels(pb.ListModelsRequest(provider="vllm"))
    assert {m.id for m in page.models} == {"vllm/gpt-4o-mini", "vllm/qwen2.5-7b-instruct"}
    assert all(m.provider == "vllm" and m.source == pb.MODEL_SOURCE_PROVIDER for m in page.models)
    assert {m.provider_model for m in page.models} == set(VLLM_MODELS)
    assert page.total_size == 2
    everything = {m.id: m for m in (await three.stub.ListModels(pb.ListModelsRequest(page_size=1000))).models}
    assert everything["gpt-4o-mini"].provider == "openai"  # the catalog entry is still openai's
    assert everything["vllm/gpt-4o-mini"].provider == "vllm"
    assert "openai/gpt-4o-mini" not in everything  # openai's live gpt-4o-mini is the catalog entry


async def test_get_model_finds_what_chat_serves_on_a_named_provider(
    three: Gateway, vllm_upstream: OpenAIEmulator
) -> None:
    for model_id in ("vllm/gpt-4o-mini", "vllm/qwen2.5-7b-instruct"):
        model = (await three.stub.GetModel(pb.GetModelRequest(name=f"models/{model_id}"))).model
        assert (model.id, model.provider, model.source) == (model_id, "vllm", pb.MODEL_SOURCE_PROVIDER)
        assert model.availability == pb.AVAILABILITY_AVAILABLE
        reply = await three.stub.Chat(chat(model_id))
        assert reply.provider == "vllm" and reply.model == model_id.removeprefix("vllm/")
    assert vllm_upstream.served == {"gpt-4o-mini": 1, "qwen2.5-7b-instruct": 1}
    error = await expect_error(three.stub.GetModel(pb.GetModelRequest(name="models/vllm/not-served")))
    assert (error.code, error.info.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


async def test_ollama_default_tag_is_listed_once(gateway: Gateway) -> None:
    page = await gateway.stub.ListModels(pb.ListModelsRequest(provider="ollama", page_size=1000))
    ids = [m.id for m in page.models]
    assert len(ids) == len(set(ids))
    # `llama3.2` (catalog) and `llama3.2:latest` (live) are one model; so are the nomic embedders
    assert "llama3.2" in ids and "ollama/llama3.2:latest" not in ids
    assert "nomic-embed-text" in ids and "ollama/nomic-embed-text:latest" not in ids
    assert "ollama/tinyllama:latest" in ids  # not in the catalog: listed live
    assert page.total_size == len(ids)
    # the live name still finds the model, as the catalog entry it is
    model = (await gateway.stub.GetModel(pb.GetModelRequest(name="models/ollama/llama3.2:latest"))).model
    assert (model.id, model.source) == ("llama3.2", pb.MODEL_SOURCE_CATALOG)


async def test_filtered_list_fetches_only_that_provider(
    three: Gateway, openai_upstream: OpenAIEmulator, vllm_upstream: OpenAIEmulator, ollama_upstream: OllamaEmulator
) -> None:
    await three.stub.ListModels(pb.ListModelsRequest(provider="vllm"))
    assert fetches(openai_upstream, vllm_upstream, ollama_upstream) == {**NONE, "vllm": 1}
    await three.stub.ListModels(pb.ListModelsRequest(provider="ollama"))
    assert fetches(openai_upstream, vllm_upstream, ollama_upstream) == {
        **NONE,
        "vllm": 1,
        "ollama_tags": 1,
        "ollama_show": len(OLLAMA_MODELS),
    }
    # a provider that is not configured has no live list to fetch
    page = await three.stub.ListModels(pb.ListModelsRequest(provider="anthropic"))
    assert page.models and all(m.availability == pb.AVAILABILITY_NOT_CONFIGURED for m in page.models)
    assert fetches(openai_upstream, vllm_upstream, ollama_upstream)["openai"] == 0


async def test_get_model_fetches_only_what_the_name_needs(
    three: Gateway, openai_upstream: OpenAIEmulator, vllm_upstream: OpenAIEmulator, ollama_upstream: OllamaEmulator
) -> None:
    for name in ("models/gpt-4o-mini", "llama3.2", "models/openai/gpt-4o-mini", "models/ollama/llama3.2:latest"):
        await three.stub.GetModel(pb.GetModelRequest(name=name))  # catalog models: no live list needed
    error = await expect_error(three.stub.GetModel(pb.GetModelRequest(name="models/nowhere/x")))
    assert error.code == grpc.StatusCode.NOT_FOUND  # not a configured provider: nothing to fetch
    assert fetches(openai_upstream, vllm_upstream, ollama_upstream) == NONE

    live = (await three.stub.GetModel(pb.GetModelRequest(name="models/ollama/tinyllama:latest"))).model
    assert live.source == pb.MODEL_SOURCE_PROVIDER
    assert fetches(openai_upstream, vllm_upstream, ollama_upstream) == {
        **NONE,
        "ollama_tags": 1,
        "ollama_show": len(OLLAMA_MODELS),
    }
    await three.stub.GetModel(pb.GetModelRequest(name="models/vllm/qwen2.5-7b-instruct"))
    await three.stub.GetModel(pb.GetModelRequest(name="models/vllm/gpt-4o-mini"))
    assert fetches(openai_upstream, vllm_upstream, ollama_upstream) == {
        **NONE,
        "vllm": 1,
        "ollama_tags": 1,
        "ollama_show": len(OLLAMA_MODELS),
    }


async def test_unfiltered_list_fetches_every_provider_once(
    three: Gateway, openai_upstream: OpenAIEmulator, vllm_upstream: OpenAIEmulator, ollama_upstream: OllamaEmulator
) -> None:
    for _ in range(3):
        await three.stub.ListModels(pb.ListModelsRequest(page_size=1000))
        await three.stub.ListModels(pb.ListModelsRequest(provider="vllm"))
        await three.stub.GetModel(pb.GetModelRequest(name="models/ollama/tinyllama:latest"))
    assert fetches(openai_upstream, vllm_upstream, ollama_upstream) == {
        "openai": 1,
        "vllm": 1,
        "ollama_tags": 1,
        "ollama_show": len(OLLAMA_MODELS),
    }


async def test_capability_filter_still_works(three: Gateway) -> None:
    tools = await three.stub.ListModels(pb.ListModelsRequest(capability=pb.CAPABILITY_TOOLS, page_size=1000))
    ids = {m.id for m in tools.models}
    assert {"gpt-4o-mini", "llama3.2", "ollama/tinyllama:latest"} <= ids  # tinyllama: tools per /api/show
    assert "text-embedding-3-small" not in ids and "vllm/qwen2.5-7b-instruct" not in ids  # live default: chat
    assert all(pb.CAPABILITY_TOOLS in m.capabilities for m in tools.models)
    chatters = await three.stub.ListModels(
        pb.ListModelsRequest(provider="vllm", capability=pb.CAPABILITY_CHAT, page_size=1)
    )
    assert chatters.total_size == 2 and len(chatters.models) == 1 and chatters.next_page_token
    rest = await three.stub.ListModels(
        pb.ListModelsRequest(
            provider="vllm", capability=pb.CAPABILITY_CHAT, page_size=1, page_token=chatters.next_page_token
        )
    )
    assert {chatters.models[0].id, rest.models[0].id} == {"vllm/gpt-4o-mini", "vllm/qwen2.5-7b-instruct"}
    embedders = await three.stub.ListModels(pb.ListModelsRequest(provider="vllm", capability=pb.CAPABILITY_EMBEDDINGS))
    assert embedders.total_size == 0 and not embedders.models


async def test_concurrent_cold_lists_share_one_fetch_per_provider(
    three: Gateway, openai_upstream: OpenAIEmulator, vllm_upstream: OpenAIEmulator, ollama_upstream: OllamaEmulator
) -> None:
    gate = vllm_upstream.models_gate = asyncio.Event()
    try:
        calls = [asyncio.ensure_future(three.stub.ListModels(pb.ListModelsRequest(page_size=1000))) for _ in range(20)]
        await until(lambda: vllm_upstream.calls("/models"))
        await asyncio.sleep(0.2)  # let the other 19 calls reach the server while vllm's list is held
        assert not any(call.done() for call in calls)
    finally:
        gate.set()
    pages = await asyncio.gather(*calls)
    assert len({tuple(m.id for m in page.models) for page in pages}) == 1
    assert "vllm/qwen2.5-7b-instruct" in {m.id for m in pages[0].models}
    assert fetches(openai_upstream, vllm_upstream, ollama_upstream) == {
        "openai": 1,
        "vllm": 1,
        "ollama_tags": 1,
        "ollama_show": len(OLLAMA_MODELS),
    }


async def test_a_slow_provider_does_not_hold_up_other_providers(three: Gateway, vllm_upstream: OpenAIEmulator) -> None:
    gate = vllm_upstream.models_gate = asyncio.Event()
    try:
        everything = asyncio.ensure_future(three.stub.ListModels(pb.ListModelsRequest(page_size=1000)))
        await until(lambda: vllm_upstream.calls("/models"))
        # vllm's list is in flight (held): listing or looking up other providers must not wait for it
        async with asyncio.timeout(5):
            openai = await three.stub.ListModels(pb.ListModelsRequest(provider="openai"))
            tiny = await three.stub.GetModel(pb.GetModelRequest(name="models/ollama/tinyllama:latest"))
        assert "openai/emulated-model" in {m.id for m in openai.models}
        assert tiny.model.provider == "ollama"
        assert not everything.done()
    finally:
        gate.set()
    assert "vllm/qwen2.5-7b-instruct" in {m.id for m in (await everything).models}
    assert len(vllm_upstream.calls("/models")) == 1


# --------------------------------------------------------------------------- ModelDirectory alone


def _unused(method: str) -> Callable[..., Any]:
    def unused(self: Provider, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"the directory does not call Provider.{method}")

    return unused


def only_lists_models(cls: type[Provider]) -> type[Provider]:
    """Stubs every abstract `Provider` method the class leaves open: the directory only reads
    `name` and `kind` and calls `list_models`, so the fake stays independent of the rest."""
    for method in cls.__abstractmethods__:
        setattr(cls, method, _unused(method))
    return abc.update_abstractmethods(cls)


@only_lists_models
@dataclass(eq=False)
class FakeProvider(Provider):
    """A provider whose live list is `models`; counts `list_models` calls.

    `gate`: when set, each fetch waits for it. `failure`: raised by fetches instead of answering.
    `hang`: fetches never answer (and ignore their timeout).
    """

    name: str
    models: tuple[str, ...] = ()
    kind: str = "openai"
    passthrough: bool = False
    gate: asyncio.Event | None = None
    failure: BaseException | None = None
    hang: bool = False
    calls: int = 0

    async def list_models(self, timeout_s: float) -> tuple[LiveModel, ...]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.hang:
            await asyncio.sleep(3600)  # ignores `timeout_s`: the directory must bound it itself
        if self.failure is not None:
            raise self.failure
        return tuple(LiveModel(m) for m in self.models)

    async def aclose(self) -> None:
        return None


def directory(*providers: FakeProvider, ttl_s: float = 300.0, fetch_timeout_s: float = 5.0) -> ModelDirectory:
    return ModelDirectory(
        load_catalog(), ProviderRegistry({p.name: p for p in providers}), ttl_s=ttl_s, fetch_timeout_s=fetch_timeout_s
    )


async def ids(models: ModelDirectory, provider: str = "") -> list[str]:
    page = await models.list(provider, None, 1000, "")
    return [m.info.id for m in page.models]


def unavailable(provider: str) -> GatewayError:
    return provider_errors.connection_failed(provider, "", "connection refused")


async def settle() -> None:
    """Lets every ready task run until all are waiting on something."""
    for _ in range(10):
        await asyncio.sleep(0)


def calls_of(providers: Sequence[FakeProvider]) -> dict[str, int]:
    return {p.name: p.calls for p in providers}


async def test_unit_concurrent_cold_callers_share_one_fetch_per_provider() -> None:
    gate = asyncio.Event()
    providers = [FakeProvider("openai", ("emulated-model",), gate=gate), FakeProvider("vllm", VLLM_MODELS, gate=gate)]
    models = directory(*providers)
    callers: list[asyncio.Future[Any]] = [asyncio.ensure_future(ids(models)) for _ in range(20)]
    callers += [asyncio.ensure_future(ids(models, "vllm")) for _ in range(5)]
    callers += [asyncio.ensure_future(models.get("models/vllm/gpt-4o-mini")) for _ in range(5)]
    await settle()
    assert calls_of(providers) == {"openai": 1, "vllm": 1}
    assert not any(c.done() for c in callers)
    gate.set()
    results = await asyncio.gather(*callers)
    assert len({tuple(r) for r in results[:20]}) == 1
    assert {"vllm/gpt-4o-mini", "vllm/qwen2.5-7b-instruct", "openai/emulated-model"} <= set(results[0])
    assert results[20] == ["vllm/gpt-4o-mini", "vllm/qwen2.5-7b-instruct"]
    assert calls_of(providers) == {"openai": 1, "vllm": 1}


async def test_unit_warm_cache_answers_without_suspending() -> None:
    providers = [FakeProvider("openai", ("emulated-model",)), FakeProvider("vllm", VLLM_MODELS)]
    models = directory(*providers)
    await ids(models)  # warms every provider's list
    for call in (
        models.list("", None, 1000, ""),
        models.list("vllm", Capability.CHAT, 10, ""),
        models.get("models/vllm/qwen2.5-7b-instruct"),
        models.get("gpt-4o-mini"),
    ):
        # the lock-free fast path: the coroutine completes on its first step, awaiting nothing
        try:
            with pytest.raises(StopIteration):
                call.send(None)
        finally:
            call.close()
    assert calls_of(providers) == {"openai": 1, "vllm": 1}


async def test_unit_fetches_only_what_a_call_needs() -> None:
    providers = [FakeProvider("openai", ("emulated-model",)), FakeProvider("vllm", VLLM_MODELS)]
    models = directory(*providers)
    assert (await models.get("models/gpt-4o-mini")).info.provider == "openai"
    assert (await models.get("openai/gpt-4o-mini")).info.id == "gpt-4o-mini"  # catalog's provider model
    with pytest.raises(GatewayError) as caught:
        await models.get("models/anthropic/claude-x")  # a provider that is not configured
    assert caught.value.reason == "MODEL_NOT_FOUND"
    assert calls_of(providers) == {"openai": 0, "vllm": 0}
    assert await ids(models, "vllm") == ["vllm/gpt-4o-mini", "vllm/qwen2.5-7b-instruct"]
    assert calls_of(providers) == {"openai": 0, "vllm": 1}
    assert (await models.get("models/openai/emulated-model")).info.source is ModelSource.PROVIDER
    assert calls_of(providers) == {"openai": 1, "vllm": 1}


async def test_unit_slow_provider_does_not_block_another() -> None:
    gate = asyncio.Event()
    slow, fast = FakeProvider("vllm", VLLM_MODELS, gate=gate), FakeProvider("openai", ("emulated-model",))
    models = directory(slow, fast)
    everything = asyncio.ensure_future(ids(models))
    await settle()
    async with asyncio.timeout(1):
        assert "openai/emulated-model" in await ids(models, "openai")
    assert not everything.done()
    gate.set()
    assert "vllm/qwen2.5-7b-instruct" in await everything
    assert calls_of([slow, fast]) == {"vllm": 1, "openai": 1}


async def test_unit_failure_keeps_last_good_list_and_does_not_poison_later_fetches() -> None:
    vllm = FakeProvider("vllm", ("first",))
    models = directory(vllm, ttl_s=0.0)  # every call refetches
    assert await ids(models, "vllm") == ["vllm/first"]
    vllm.failure = unavailable("vllm")
    assert await ids(models, "vllm") == ["vllm/first"]  # the last good list
    assert await ids(models, "vllm") == ["vllm/first"]
    vllm.failure, vllm.models = None, ("second",)
    assert await ids(models, "vllm") == ["vllm/second"]
    assert vllm.calls == 4


async def test_unit_failed_cold_fetch_lists_the_catalog_only_until_the_ttl() -> None:
    vllm = FakeProvider("vllm", VLLM_MODELS, failure=unavailable("vllm"))
    models = directory(vllm)
    assert await ids(models, "vllm") == []
    vllm.failure = None
    assert await ids(models, "vllm") == []  # the failure is remembered for the TTL, as before
    assert vllm.calls == 1


async def test_unit_unexpected_error_reaches_every_waiter_and_is_not_cached() -> None:
    gate = asyncio.Event()
    vllm = FakeProvider("vllm", VLLM_MODELS, gate=gate, failure=RuntimeError("adapter bug"))
    models = directory(vllm)
    callers = [asyncio.ensure_future(ids(models, "vllm")) for _ in range(3)]
    await settle()
    gate.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert vllm.calls == 1
    vllm.failure = None
    assert await ids(models, "vllm") == ["vllm/gpt-4o-mini", "vllm/qwen2.5-7b-instruct"]
    assert vllm.calls == 2


async def test_unit_a_cancelled_caller_does_not_cancel_the_shared_fetch() -> None:
    gate = asyncio.Event()
    vllm = FakeProvider("vllm", VLLM_MODELS, gate=gate)
    models = directory(vllm)
    first, second = asyncio.ensure_future(ids(models, "vllm")), asyncio.ensure_future(ids(models, "vllm"))
    await settle()
    first.cancel()
    await settle()
    gate.set()
    assert await second == ["vllm/gpt-4o-mini", "vllm/qwen2.5-7b-instruct"]
    assert first.cancelled() and vllm.calls == 1


async def test_unit_a_hanging_provider_is_bounded_by_the_fetch_timeout() -> None:
    vllm = FakeProvider("vllm", VLLM_MODELS, hang=True)
    models = directory(vllm, ttl_s=0.0, fetch_timeout_s=0.05)
    async with asyncio.timeout(2):
        assert await ids(models, "vllm") == []
    vllm.hang = False
    assert await ids(models, "vllm") == ["vllm/gpt-4o-mini", "vllm/qwen2.5-7b-instruct"]
    assert vllm.calls == 2


async def test_unit_ollama_default_tag_matches_the_catalog() -> None:
    ollama = FakeProvider("ollama", ("llama3.2:latest", "llama3.1:8b", "tinyllama:latest", "qwen2.5"), kind="ollama")
    models = directory(ollama)
    listed = await ids(models, "ollama")
    assert len(listed) == len(set(listed))
    assert "llama3.2" in listed and "ollama/llama3.2:latest" not in listed  # default tag: the catalog model
    assert "ollama/llama3.1:8b" in listed  # another tag is another model
    assert "qwen2.5" in listed and "ollama/qwen2.5" not in listed
    assert "ollama/tinyllama:latest" in listed
    assert (await models.get("models/ollama/llama3.2")).info.id == "llama3.2"
    assert (await models.get("models/ollama/llama3.2:latest")).info.id == "llama3.2"
    # `:latest` is Ollama's convention only: an OpenAI-compatible server's tag is part of the id
    vllm = FakeProvider("vllm", ("llama3.2:latest",))
    assert await ids(directory(vllm), "vllm") == ["vllm/llama3.2:latest"]


async def test_unit_live_id_known_for_another_provider_is_listed_under_its_own() -> None:
    openai, vllm = FakeProvider("openai", ("gpt-4o-mini",)), FakeProvider("vllm", ("gpt-4o-mini",))
    models = directory(openai, vllm)
    listed = await ids(models)
    assert "vllm/gpt-4o-mini" in listed and "openai/gpt-4o-mini" not in listed
    assert listed.count("gpt-4o-mini") == 1
    view = await models.get("models/vllm/gpt-4o-mini")
    assert (view.info.provider, view.info.provider_model, view.info.source) == (
        "vllm",
        "gpt-4o-mini",
        ModelSource.PROVIDER,
    )
