"""Generated protobuf and gRPC stubs for the `llm_gateway.admin.v1` contract (do not edit by hand).

Regenerate with `make proto` from `protos/llm_gateway/admin/v1/admin.proto`.
"""
