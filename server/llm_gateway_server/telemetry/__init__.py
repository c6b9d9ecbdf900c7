"""Telemetry: structured logging (metrics arrive with the interceptors)."""
