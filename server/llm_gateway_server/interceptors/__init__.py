"""gRPC interceptors around the servicer, outermost first: logging (and metrics) → auth → rate
limit → cache. Health and reflection are exempt."""
