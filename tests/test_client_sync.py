"""The shipped sync client (`llm_gateway_client.GatewayClient`) with pytest-grpc.

pytest-grpc (named in the design card) serves a *synchronous* `grpc.server`; it cannot host the
gateway's grpc.aio servicer, so here it hosts a small sync test servicer that checks what the client
sends and answers with fixed messages and a rich error. The gateway itself is exercised through the
same client in `test_client_against_gateway` (real aio server, real upstream emulator).
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc
from llm_gateway_client import AsyncGatewayClient, GatewayCallError, GatewayClient

from .conftest import Gateway


class RecordingServicer(pb_grpc.LLMGatewayServiceServicer):
    """A sync servicer that answers fixed replies and records requests and metadata."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.metadata: list[dict[str, str]] = []

    def Chat(self, request: pb.ChatRequest, context: grpc.ServicerContext) -> pb.ChatResponse:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if request.model == "fail":
            info = any_pb2.Any()
            info.Pack(
                error_details_pb2.ErrorInfo(reason="MODEL_NOT_FOUND", domain="llm-gateway", metadata={"model": "fail"})
            )
            retry = any_pb2.Any()
            retry.Pack(error_details_pb2.RetryInfo(retry_delay={"seconds": 2}))
            context.abort_with_status(
                rpc_status.to_status(
                    status_pb2.Status(code=code_pb2.NOT_FOUND, message="no such model", details=[info, retry])
                )
            )
        return pb.ChatResponse(
            model=request.model,
            provider="test",
            message=pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentPart(text="hello back")]),
            finish_reason=pb.FINISH_REASON_STOP,
        )

    def ChatStream(self, request: pb.ChatStreamRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        yield pb.ChatStreamResponse(id="s1", delta=pb.ChatDelta(text="a"))
        yield pb.ChatStreamResponse(id="s1", final=pb.ChatStreamFinal(finish_reason=pb.FINISH_REASON_STOP))


@pytest.fixture(scope="module")
def grpc_add_to_server() -> Any:
    return pb_grpc.add_LLMGatewayServiceServicer_to_server


@pytest.fixture(scope="module")
def grpc_servicer() -> RecordingServicer:
    return RecordingServicer()


@pytest.fixture(scope="module")
def grpc_stub_cls(grpc_channel: grpc.Channel) -> Any:
    return pb_grpc.LLMGatewayServiceStub


def test_sync_client_builds_requests_and_sends_key(
    grpc_channel: grpc.Channel, grpc_servicer: RecordingServicer
) -> None:
    client = GatewayClient(channel=grpc_channel, api_key="gw-key")
    reply = client.chat(
        "m", "Hi", system="Be brief.", provider="openai", generation=pb.GenerationOptions(max_output_tokens=5)
    )
    assert reply.message.content[0].text == "hello back"
    sent = grpc_servicer.requests[-1]
    assert [m.role for m in sent.messages] == [pb.ROLE_SYSTEM, pb.ROLE_USER]
    assert sent.routing.provider == "openai" and sent.generation.max_output_tokens == 5
    assert grpc_servicer.metadata[-1]["authorization"] == "Bearer gw-key"
    events = list(client.chat_stream("m", "Hi"))
    assert [e.WhichOneof("event") for e in events] == ["delta", "final"]
    assert isinstance(grpc_servicer.requests[-1], pb.ChatStreamRequest)


def test_sync_client_decodes_rich_errors(grpc_channel: grpc.Channel) -> None:
    client = GatewayClient(channel=grpc_channel)
    with pytest.raises(GatewayCallError) as caught:
        client.chat("fail", "Hi")
    error = caught.value
    assert error.code == grpc.StatusCode.NOT_FOUND and error.reason == "MODEL_NOT_FOUND"
    assert error.metadata == {"model": "fail"} and error.retry_after_s == 2.0


async def test_client_against_gateway(gateway: Gateway) -> None:
    async with AsyncGatewayClient(gateway.target) as client:
        reply = await client.chat("m", "via client")
        assert reply.message.content[0].text == "echo: via client"
        events = [e async for e in client.chat_stream("m", "streamed")]
        assert events[-1].final.finish_reason == pb.FINISH_REASON_STOP
        with pytest.raises(GatewayCallError) as caught:
            await client.chat("status-503", "x")
        assert caught.value.reason == "PROVIDER_UNAVAILABLE" and caught.value.metadata["provider"] == "openai"
