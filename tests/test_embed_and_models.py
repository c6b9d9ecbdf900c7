"""Embed, ListModels and GetModel through the gateway against both emulators."""

from __future__ import annotations

import grpc
import pytest

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .conftest import Gateway, expect_error
from .emulators.ollama_server import OllamaEmulator
from .emulators.openai_server import OpenAIEmulator


async def test_openai_embed_keeps_input_order(gateway: Gateway, openai_upstream: OpenAIEmulator) -> None:
    inputs = ["a", "bbb", "cc"]
    response = await gateway.stub.Embed(pb.EmbedRequest(model="text-embedding-3-small", inputs=inputs, dimensions=4))
    assert response.provider == "openai" and response.model == "text-embedding-3-small"
    assert [e.index for e in response.embeddings] == [0, 1, 2]
    # the emulator puts len(input) first; base64 float32 decoding by the SDK round-trips exactly
    assert [e.values[0] for e in response.embeddings] == [1.0, 3.0, 2.0]
    assert all(len(e.values) == 4 for e in response.embeddings)
    assert response.usage.input_tokens == 9 and response.usage.output_tokens == 0
    assert response.cost.priced and response.cost.input_usd == pytest.approx(9 * 0.02 / 1e6)
    body = openai_upstream.calls("/embeddings")[-1].body
    assert body["input"] == inputs and body["dimensions"] == 4


async def test_ollama_embed(gateway: Gateway, ollama_upstream: OllamaEmulator) -> None:
    response = await gateway.stub.Embed(pb.EmbedRequest(model="nomic-embed-text", inputs=["hello", "hi"]))
    assert response.provider == "ollama"
    assert [list(e.values) for e in response.embeddings] == [[5.0, 0.25, 0.5], [2.0, 0.25, 0.5]]
    assert response.usage.input_tokens == 4
    assert ollama_upstream.requests[-1].body["input"] == ["hello", "hi"]


async def test_embed_with_chat_model_names_embedding_models(gateway: Gateway) -> None:
    error = await expect_error(gateway.stub.Embed(pb.EmbedRequest(model="gpt-4o-mini", inputs=["x"])))
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CAPABILITY_NOT_SUPPORTED")
    assert "text-embedding-3-small" in error.message and "nomic-embed-text" in error.message


async def test_embed_upstream_error(gateway: Gateway) -> None:
    error = await expect_error(gateway.stub.Embed(pb.EmbedRequest(model="status-503", inputs=["x"])))
    assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")


async def test_list_models_merges_catalog_and_live_lists(gateway: Gateway) -> None:
    response = await gateway.stub.ListModels(pb.ListModelsRequest(page_size=1000))
    ids = {m.id: m for m in response.models}
    assert response.total_size == len(response.models)
    # built-in catalog entries of all four providers
    assert {"gpt-4o-mini", "claude-haiku-4-5", "llama-3.1-8b-instant", "llama3.2"} <= set(ids)
    # live lists: models the catalog does not know appear as provider/model
    assert ids["openai/emulated-model"].source == pb.MODEL_SOURCE_PROVIDER
    assert ids["ollama/tinyllama:latest"].source == pb.MODEL_SOURCE_PROVIDER
    mini = ids["gpt-4o-mini"]
    assert mini.name == "models/gpt-4o-mini" and mini.availability == pb.AVAILABILITY_AVAILABLE
    assert mini.context_window == 128000 and mini.pricing.input_per_million_usd == 0.15
    assert {"claude-haiku-4-5", "llama-3.1-8b-instant", "llama3.2"} <= set(mini.equivalent_models)
    assert ids["claude-haiku-4-5"].availability == pb.AVAILABILITY_NOT_CONFIGURED


async def test_list_models_filters_and_paginates(gateway: Gateway) -> None:
    embedders = await gateway.stub.ListModels(pb.ListModelsRequest(capability=pb.CAPABILITY_EMBEDDINGS))
    assert {m.id for m in embedders.models} >= {"text-embedding-3-small", "nomic-embed-text"}
    assert all(pb.CAPABILITY_EMBEDDINGS in m.capabilities for m in embedders.models)

    seen: list[str] = []
    token = ""
    while True:
        page = await gateway.stub.ListModels(pb.ListModelsRequest(provider="openai", page_size=3, page_token=token))
        assert len(page.models) <= 3 and all(m.provider == "openai" for m in page.models)
        seen.extend(m.id for m in page.models)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == page.total_size


async def test_list_models_rejects_foreign_token_and_bad_size(gateway: Gateway) -> None:
    page = await gateway.stub.ListModels(pb.ListModelsRequest(provider="openai", page_size=1))
    error = await expect_error(
        gateway.stub.ListModels(pb.ListModelsRequest(provider="ollama", page_token=page.next_page_token))
    )
    assert (error.code, error.info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert error.bad_request is not None and error.bad_request.field_violations[0].field == "page_token"
    error = await expect_error(gateway.stub.ListModels(pb.ListModelsRequest(page_token="!!!")))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    error = await expect_error(gateway.stub.ListModels(pb.ListModelsRequest(page_size=5000)))
    assert error.bad_request is not None and error.bad_request.field_violations[0].field == "page_size"


async def test_get_model(gateway: Gateway) -> None:
    for name in ("models/gpt-4o-mini", "gpt-4o-mini"):
        model = (await gateway.stub.GetModel(pb.GetModelRequest(name=name))).model
        assert model.id == "gpt-4o-mini" and model.provider == "openai"
    live = (await gateway.stub.GetModel(pb.GetModelRequest(name="models/ollama/tinyllama:latest"))).model
    assert live.source == pb.MODEL_SOURCE_PROVIDER
    error = await expect_error(gateway.stub.GetModel(pb.GetModelRequest(name="models/nope")))
    assert (error.code, error.info.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    error = await expect_error(gateway.stub.GetModel(pb.GetModelRequest(name="")))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_listing_survives_a_provider_that_is_down(make_gateway: object, openai_upstream: OpenAIEmulator) -> None:
    gateway = await make_gateway({"OPENAI_BASE_URL": openai_upstream.base_url, "OLLAMA_HOST": "http://127.0.0.1:9"})  # type: ignore[operator]
    response = await gateway.stub.ListModels(pb.ListModelsRequest(page_size=1000))
    assert "openai/emulated-model" in {m.id for m in response.models}


async def test_ollama_live_models_are_described_by_show(gateway: Gateway, ollama_upstream: OllamaEmulator) -> None:
    model = (await gateway.stub.GetModel(pb.GetModelRequest(name="models/ollama/tinyllama:latest"))).model
    assert set(model.capabilities) == {
        pb.CAPABILITY_CHAT,
        pb.CAPABILITY_STREAMING,
        pb.CAPABILITY_JSON_MODE,
        pb.CAPABILITY_TOOLS,
    }
    assert model.context_window == 131072
    assert any(r.path == "/api/show" for r in ollama_upstream.requests)


async def test_live_lists_are_cached(gateway: Gateway, openai_upstream: OpenAIEmulator) -> None:
    for _ in range(3):
        await gateway.stub.ListModels(pb.ListModelsRequest())
    assert len(openai_upstream.calls("/models")) == 1  # models_list_ttl_s defaults to 300 s


async def test_ollama_embed_batches_large_requests(gateway: Gateway, ollama_upstream: OllamaEmulator) -> None:
    inputs = [f"text {i}" for i in range(300)]
    response = await gateway.stub.Embed(pb.EmbedRequest(model="nomic-embed-text", inputs=inputs))
    assert len(response.embeddings) == 300
    assert [e.values[0] for e in response.embeddings] == [float(len(t)) for t in inputs]
    batches = [r.body["input"] for r in ollama_upstream.requests if r.path == "/api/embed"]
    assert [len(b) for b in batches] == [256, 44]
    assert response.usage.input_tokens == 600
