"""The control plane's database (SQLAlchemy 2 async + Alembic): keys, teams and the usage ledger,
on SQLite by default and PostgreSQL at scale. The data plane reaches it only through the key
cache and the ledger writer (never on the hot path)."""
