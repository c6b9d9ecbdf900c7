"""The grpc.aio server: the gateway service, `grpc.health.v1` health and server reflection.

Health answers SERVING for "" and for "llm_gateway.v1.LLMGatewayService" once the server runs
(and for the extra names it is given, e.g. `provider/<name>`). `GrpcServer.stop` drains: every
health status becomes NOT_SERVING, the server stops accepting calls and gives in-flight calls
`grace_period_s` to finish before cancelling them. What the server serves is built elsewhere
(`app.py`, the composition root).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc

from .decoding import add_gateway_service
from .health import GatewayHealthServicer
from .reflection import enable_reflection

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LLMGatewayService"].full_name


class BindError(RuntimeError):
    """The gRPC address cannot be bound."""


@dataclass(frozen=True, slots=True)
class ConnectionPolicy:
    """How long client connections live and how they are kept alive, seconds.

    `max_age_s` makes long-lived HTTP/2 connections rebalance (GOAWAY after this age, closed after
    `max_age_grace_s`; calls in flight continue meanwhile); the server pings idle connections every
    `keepalive_time_s` and drops one whose ping goes unanswered for `keepalive_timeout_s`; a client
    pinging more often than `keepalive_min_time_s` gets GOAWAY "too_many_pings".
    """

    max_age_s: float = 600.0
    max_age_grace_s: float = 300.0
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    keepalive_min_time_s: float = 10.0

    def options(self) -> list[tuple[str, int]]:
        """The grpc core channel arguments (ms)."""
        return [
            ("grpc.max_connection_age_ms", int(self.max_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(self.max_age_grace_s * 1000)),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", int(self.keepalive_min_time_s * 1000)),
            ("grpc.http2.max_ping_strikes", 2),
        ]


@dataclass
class GrpcServer:
    """A started gRPC server. `port` is the bound port (useful with port 0)."""

    server: grpc.aio.Server
    health: GatewayHealthServicer
    port: int
    grace_period_s: float

    async def enter_drain(self) -> None:
        """Health NOT_SERVING for every name, at once; open health watches end. Calls are still
        accepted (the pre-stop delay) until `stop`."""
        await self.health.enter_drain()

    async def stop(self) -> None:
        """Drains: health NOT_SERVING, stop accepting, wait up to the grace period (returns as
        soon as the calls in flight are done)."""
        await self.enter_drain()
        await self.server.stop(self.grace_period_s)


ServiceAdder = Callable[[grpc.aio.Server], None]
"""Registers one more service on a server (e.g. `admin.servicer.add_admin_service` bound to its
servicer)."""


async def start_grpc(
    servicer: pb_grpc.LLMGatewayServiceServicer | None,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    reuse_port: bool,
    grace_period_s: float,
    health_names: Iterable[str] = (),
    credentials: grpc.ServerCredentials | None = None,
    connections: ConnectionPolicy | None = None,
    reflection_on: bool = True,
    services: Sequence[tuple[str, ServiceAdder]] = (),
) -> GrpcServer:
    """Serves `servicer` behind `interceptors` (outermost first) with health and reflection.

    Args:
        servicer: the gateway service (None: a server of `services` only, e.g. the admin API on
            its own port).
        services: more services, as (full service name, adder): health reports each SERVING
            and reflection lists it.
        host / port: bind address (port 0 picks a free port).
        max_message_bytes: largest request and response message, bytes.
        reuse_port: SO_REUSEPORT (only for `--workers`: a second gateway on a busy port must fail).
        grace_period_s: drain time given to in-flight calls by `stop`, seconds.
        health_names: health service names set SERVING besides "" and the gateway service.
        credentials: TLS server credentials for the port (`transport.tls.ServerTls.credentials`);
            None serves plaintext (the loopback rule is enforced by the caller, `app.py`).
        connections: connection age and keepalive (default `ConnectionPolicy()`).
        reflection_on: serve server reflection (v1 and v1alpha).
    Raises:
        BindError: the address cannot be bound.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        *(connections or ConnectionPolicy()).options(),
    ]
    server = grpc.aio.server(options=options, interceptors=list(interceptors))
    names = [SERVICE_NAME] if servicer is not None else []
    if servicer is not None:
        add_gateway_service(servicer, server)
    for name, add in services:
        add(server)
        names.append(name)
    health_servicer = GatewayHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_on:
        enable_reflection(server, (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
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
    for name in ("", *names, *health_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return GrpcServer(server, health_servicer, bound, grace_period_s)
