"""Provider adapters: one module pair (adapter + pure wire mapping) per SDK, a base interface,
shared error mapping, and the registry that builds them from settings."""
