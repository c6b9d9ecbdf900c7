"""`python -m llm_gateway_server` runs the `llm-gateway` command line."""

from .cli import main

raise SystemExit(main())
