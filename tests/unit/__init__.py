"""Unit tests of pure modules: no gRPC server, no HTTP, no emulators."""
