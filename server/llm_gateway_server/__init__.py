"""LLM Gateway server: a gRPC service that routes chat and embedding calls to LLM providers.

Layers (data flows one way): transport (servicer) → routing (router, resolver, catalog) →
providers (one adapter per SDK); `domain` types are shared by all; `config` loads settings.
"""

__version__ = "0.1.0"
