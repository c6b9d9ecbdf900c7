"""The gRPC floor: a bare grpc.aio server (uvloop, like the gateway) with no interceptors, no
protobuf parsing and no upstream. What it costs per call and per streamed message is what any
Python gRPC service pays on this machine before doing anything; `bench/run.py` reports it beside
the gateway's figures.

    python bench/grpc_floor.py --port 8299

Methods (bytes in, bytes out): `/floor.Floor/Unary` answers 200 bytes (about a ChatResponse);
`/floor.Floor/Stream` sends 50 messages of 60 bytes (about a ChatStreamResponse delta).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import grpc
import uvloop

ANSWER = b"x" * 200
DELTA = b"y" * 60
STREAM_MESSAGES = 50


def _identity(data: bytes) -> bytes:
    return data


async def _unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    del request, context
    return ANSWER


async def _stream(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
    del request, context
    for _ in range(STREAM_MESSAGES):
        yield DELTA


def build_server(address: str) -> tuple[grpc.aio.Server, int]:
    """The floor server on `address` (not started) and its bound port."""
    server = grpc.aio.server()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            _unary, request_deserializer=_identity, response_serializer=_identity
        ),
        "Stream": grpc.unary_stream_rpc_method_handler(
            _stream, request_deserializer=_identity, response_serializer=_identity
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Floor", handlers),))
    return server, server.add_insecure_port(address)


async def serve(port: int) -> None:
    server, _ = build_server(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
