"""gRPC transport: server set-up, servicer (protobuf ↔ domain), validation and status mapping."""
