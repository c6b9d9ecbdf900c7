"""A small typed client for the LLM Gateway (sync and asyncio) over the generated stubs.

    from llm_gateway_client import GatewayClient
    with GatewayClient("127.0.0.1:50051") as client:
        reply = client.chat("gpt-4o-mini", "Hello")
        print(reply.message.content[0].text)

Failures raise `GatewayCallError`, which exposes the status code and the decoded
`google.rpc.ErrorInfo` (reason, metadata) and `RetryInfo` delay.
"""

from .client import AsyncGatewayClient, GatewayCallError, GatewayClient, build_chat_request, build_chat_stream_request

__all__ = ["AsyncGatewayClient", "GatewayCallError", "GatewayClient", "build_chat_request", "build_chat_stream_request"]
