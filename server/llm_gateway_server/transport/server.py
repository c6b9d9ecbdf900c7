"""The grpc.aio server: the gateway service, `grpc.health.v1` health and server reflection.

Health answers SERVING for "" and for "llm_gateway.v1.LLMGatewayService" once the server runs
(and for the extra names it is given, e.g. `provider/<name>`). `GrpcServer.stop` drains: every
health status becomes NOT_SERVING, the server stops accepting calls and gives in-flight calls
`grace_period_s` to finish before cancelling them. What the server serves is built elsewhere
(`app.py`, the composition root).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc

from .decoding import add_gateway_service

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LLMGatewayService"].full_name


class BindError(RuntimeError):
    """The gRPC address cannot be bound."""


@dataclass
class GrpcServer:
    """A started gRPC server. `port` is the bound port (useful with port 0)."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    grace_period_s: float

    async def stop(self) -> None:
        """Drains: health NOT_SERVING, stop accepting, wait up to the grace period."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_period_s)


async def start_grpc(
    servicer: pb_grpc.LLMGatewayServiceServicer,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    reuse_port: bool,
    grace_period_s: float,
    health_names: Iterable[str] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> GrpcServer:
    """Serves `servicer` behind `interceptors` (outermost first) with health and reflection.

    Args:
        host / port: bind address (port 0 picks a free port).
        max_message_bytes: largest request and response message, bytes.
        reuse_port: SO_REUSEPORT (only for `--workers`: a second gateway on a busy port must fail).
        grace_period_s: drain time given to in-flight calls by `stop`, seconds.
        health_names: health service names set SERVING besides "" and the gateway service.
        credentials: TLS server credentials for the port (`transport.tls.ServerTls.credentials`);
            None serves plaintext (the loopback rule is enforced by the caller, `app.py`).
    Raises:
        BindError: the address cannot be bound.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    server = grpc.aio.server(options=options, interceptors=list(interceptors))
    add_gateway_service(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    try:
        bound = (
            server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
        )
    except RuntimeError as exc:
        raise BindError(f"cannot bind {address}") from exc
    if bound == 0:
        raise BindError(f"cannot bind {address}")
    await server.start()
    for name in ("", SERVICE_NAME, *health_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return GrpcServer(server, health_servicer, bound, grace_period_s)
