"""A small typed client for the LLM Gateway (sync and asyncio) over the generated stubs.

    from llm_gateway_client import GatewayClient
    with GatewayClient("127.0.0.1:50051") as client:
        reply = client.chat("gpt-4o-mini", "Hello")
        print(reply.message.content[0].text)

Failures raise `GatewayCallError`, which exposes the status code and the decoded
`google.rpc.ErrorInfo` (reason, metadata) and `RetryInfo` delay. `chat_stream` returns a
`ChatStream` / `AsyncChatStream` that cancels its call as soon as the consumer is done with it.
"""

from .client import (
    AsyncChatStream,
    AsyncGatewayClient,
    ChatStream,
    GatewayCallError,
    GatewayClient,
    build_chat_request,
    build_chat_stream_request,
)

__all__ = [
    "AsyncChatStream",
    "AsyncGatewayClient",
    "ChatStream",
    "GatewayCallError",
    "GatewayClient",
    "build_chat_request",
    "build_chat_stream_request",
]
