"""Alembic environment of the store: runs migrations on the connection the store passes in
`config.attributes["connection"]`, inside the transaction (and lock) the store already holds
(`store/sql.py`). There is no URL here and no offline mode."""

from __future__ import annotations

from alembic import context

from llm_gateway_server.store.models import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the store's migrations through llm_gateway_server.store.sql (or `llm-gateway db upgrade`)")
context.configure(connection=connection, target_metadata=metadata, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
