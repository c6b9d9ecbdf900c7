"""Routing: model catalog, model-name resolution, the router (data plane) and model listing."""
