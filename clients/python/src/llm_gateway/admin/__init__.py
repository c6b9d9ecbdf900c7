"""Generated stubs of the `llm_gateway.admin` packages (do not edit by hand)."""
