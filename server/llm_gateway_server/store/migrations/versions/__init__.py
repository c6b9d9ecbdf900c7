"""Alembic revision files (one module per revision; Alembic skips this `__init__`)."""
