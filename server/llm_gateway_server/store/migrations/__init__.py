"""Alembic migrations of the store, shipped inside the package so an installed gateway can
migrate its database (`open_store(..., migrate=True)` at start, or `llm-gateway db upgrade`).

`HEAD_REVISION` is the newest revision in `versions/`: `open_store` compares the database's
`alembic_version` with it and skips Alembic entirely when they match (a test checks that it is
Alembic's head). A new revision file must update it.

There is no alembic.ini: migrations run on a connection the store hands to `env.py` through
`Config.attributes["connection"]` (see `store/sql.py`).
"""

from pathlib import Path

HEAD_REVISION = "0001"
MIGRATIONS_DIR = Path(__file__).resolve().parent
