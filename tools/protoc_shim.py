"""A protoc plugin shim so `buf generate` can drive grpcio-tools' built-in generators.

buf has no built-in gRPC Python plugin and remote plugins are unreachable offline. This script
speaks the protoc plugin protocol (CodeGeneratorRequest on stdin, CodeGeneratorResponse on
stdout) and delegates to the pinned protoc inside grpcio-tools, so `buf generate` and
`make proto` produce byte-identical files.

Usage (from buf.gen.yaml): ``python tools/protoc_shim.py {python|pyi|grpc_python}``.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
from collections.abc import Iterable

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc

_KINDS = ("python", "pyi", "grpc_python")


def _clear_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


def main() -> int:
    """Run one generator kind over the request read from stdin; returns the exit status."""
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    if kind not in _KINDS:
        sys.stderr.write(f"usage: protoc_shim.py {{{'|'.join(_KINDS)}}}\n")
        return 2
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        descriptors = descriptor_pb2.FileDescriptorSet(file=request.proto_file)
        for file in descriptors.file:  # protoc sets json_name only when asked; buf always does
            _clear_json_names(file.message_type)
        (root / "in.pb").write_bytes(descriptors.SerializeToString())
        out = root / "out"
        out.mkdir()
        status = protoc.main(
            ["protoc", f"--descriptor_set_in={root / 'in.pb'}", f"--{kind}_out={out}", *request.file_to_generate]
        )
        if status != 0:
            response.error = f"grpc_tools.protoc --{kind}_out failed with status {status}"
        else:
            for path in sorted(p for p in out.rglob("*") if p.is_file()):
                response.file.add(name=str(path.relative_to(out)), content=path.read_text())
    sys.stdout.buffer.write(response.SerializeToString())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
