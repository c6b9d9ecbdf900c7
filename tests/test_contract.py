"""The v1 contract: fixed names, identical Chat/ChatStream request shapes, a comment on every
message, field, enum value and RPC, and committed stubs that match the proto."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2, json_format

from llm_gateway.v1 import llm_gateway_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
PROTO = "llm_gateway/v1/llm_gateway.proto"
ISSUE_JSON = '{"model":"m","messages":[{"role":"ROLE_USER","content":[{"text":"Hi"}]}]}'


def _fields(message: type) -> list[tuple[str, int, int, str]]:
    return [
        (f.name, f.number, f.type, f.message_type.full_name if f.message_type else "")
        for f in message.DESCRIPTOR.fields
    ]  # type: ignore[attr-defined]


def test_chat_and_stream_requests_share_fields_and_numbers() -> None:
    chat = [f for f in _fields(pb.ChatRequest) if f[0] != "metadata"]
    stream = [f for f in _fields(pb.ChatStreamRequest) if f[0] != "metadata"]
    assert chat == stream
    assert pb.ChatRequest.DESCRIPTOR.fields_by_name["metadata"].number == 9
    assert pb.ChatStreamRequest.DESCRIPTOR.fields_by_name["metadata"].number == 9
    for message in (pb.ChatRequest(), pb.ChatStreamRequest()):
        parsed = json_format.Parse(ISSUE_JSON, message)
        assert parsed.model == "m" and parsed.messages[0].content[0].text == "Hi"
    # the same bytes decode as either request type
    wire = json_format.Parse(ISSUE_JSON, pb.ChatRequest()).SerializeToString()
    assert pb.ChatStreamRequest.FromString(wire).messages[0].role == pb.ROLE_USER


def test_fixed_names() -> None:
    service = pb.DESCRIPTOR.services_by_name["LLMGatewayService"]
    assert service.full_name == "llm_gateway.v1.LLMGatewayService"
    assert {m.name for m in service.methods} >= {"Chat", "ChatStream", "Embed", "ListModels", "GetModel"}
    assert service.methods_by_name["ChatStream"].server_streaming
    assert set(pb.Role.keys()) == {"ROLE_UNSPECIFIED", "ROLE_SYSTEM", "ROLE_USER", "ROLE_ASSISTANT", "ROLE_TOOL"}
    for message, names in {
        pb.ChatResponse: {"message", "finish_reason", "usage", "model", "provider"},
        pb.Usage: {"input_tokens", "output_tokens", "total_tokens"},
        pb.EmbedRequest: {"model", "inputs"},
        pb.EmbedResponse: {"embeddings", "usage"},
        pb.Embedding: {"values"},
        pb.ListModelsRequest: {"provider", "capability", "page_size", "page_token"},
        pb.ListModelsResponse: {"models", "next_page_token"},
        pb.GetModelRequest: {"name"},
        pb.GetModelResponse: {"model"},
        pb.ChatStreamFinal: {"finish_reason", "usage"},
    }.items():
        assert names <= set(message.DESCRIPTOR.fields_by_name), message


def _descriptor_with_comments(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "set.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            PROTO,
        ],
        check=True,
    )
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]


def test_every_element_is_commented(tmp_path: Path) -> None:
    file = _descriptor_with_comments(tmp_path)
    commented = {tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()}
    missing: list[str] = []
    for i, message in enumerate(file.message_type):
        if (4, i) not in commented:
            missing.append(message.name)
        missing.extend(f"{message.name}.{f.name}" for j, f in enumerate(message.field) if (4, i, 2, j) not in commented)
    for i, enum in enumerate(file.enum_type):
        if (5, i) not in commented:
            missing.append(enum.name)
        missing.extend(v.name for j, v in enumerate(enum.value) if (5, i, 2, j) not in commented)
    for i, service in enumerate(file.service):
        missing.extend(
            f"{service.name}.{m.name}" for j, m in enumerate(service.method) if (6, i, 2, j) not in commented
        )
    assert not missing, f"uncommented: {missing}"


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            PROTO,
        ],
        check=True,
    )
    generated = tmp_path / "llm_gateway" / "v1"
    committed = ROOT / "clients" / "python" / "src" / "llm_gateway" / "v1"
    names = ["llm_gateway_pb2.py", "llm_gateway_pb2.pyi", "llm_gateway_pb2_grpc.py"]
    _, mismatch, errors = filecmp.cmpfiles(generated, committed, names, shallow=False)
    assert not mismatch and not errors, f"stubs drifted from the proto: {mismatch + errors}; run `make proto`"
