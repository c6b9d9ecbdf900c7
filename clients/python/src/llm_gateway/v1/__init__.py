"""Generated protobuf and gRPC stubs for the `llm_gateway.v1` contract (do not edit by hand).

Regenerate with `make proto` from `protos/llm_gateway/v1/llm_gateway.proto`.
"""
