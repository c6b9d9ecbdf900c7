"""Initial tables: teams, api_keys and the usage ledger (usage_records).

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Frozen copy of `store/models.py` as of this revision (a migration never imports the models).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)
_USAGE_STRINGS = {
    "request_id": 128,
    "key_id": 128,
    "team_id": 63,
    "end_user_id": 256,
    "method": 64,
    "model": 256,
    "provider": 64,
    "deployment": 256,
    "status_code": 32,
    "reason": 64,
}


def _scope_columns() -> list[sa.Column[object]]:
    """allowed_models, limits and budget: the columns keys and teams share."""
    return [
        sa.Column("allowed_models", sa.Text(), nullable=False),
        sa.Column("rpm", sa.BigInteger()),
        sa.Column("tpm", sa.BigInteger()),
        sa.Column("max_concurrent_streams", sa.BigInteger()),
        sa.Column("budget_limit_nano_usd", sa.BigInteger()),
        sa.Column("budget_period", sa.String(16)),
    ]


def upgrade() -> None:
    """Creates teams, api_keys and usage_records with their indexes."""
    op.create_table(
        "teams",
        sa.Column("id", sa.String(63), nullable=False),
        sa.Column("display_name", sa.String(128), nullable=False),
        *_scope_columns(),
        sa.Column("create_time", _TIME, nullable=False),
        sa.Column("update_time", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_teams"),
        sa.UniqueConstraint("display_name", name="uq_teams_display_name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(63), nullable=False),
        sa.Column("display_name", sa.String(128), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("secret_prefix", sa.String(32), nullable=False),
        sa.Column("team_id", sa.String(63)),
        *_scope_columns(),
        sa.Column("expire_time", _TIME),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("create_time", _TIME, nullable=False),
        sa.Column("update_time", _TIME, nullable=False),
        sa.Column("revoke_time", _TIME),
        sa.Column("previous_secret_sha256", sa.String(64)),
        sa.Column("previous_secret_expire_time", _TIME),
        sa.Column("configured", sa.Boolean(), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("display_name", name="uq_api_keys_display_name"),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], name="fk_api_keys_team_id_teams"),
    )
    op.create_index("ix_api_keys_secret_sha256", "api_keys", ["secret_sha256"], unique=True)
    op.create_index("ix_api_keys_previous_secret_sha256", "api_keys", ["previous_secret_sha256"])
    op.create_index("ix_api_keys_team_id", "api_keys", ["team_id"])
    op.create_table(
        "usage_records",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("time", _TIME, nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        *(sa.Column(name, sa.String(length), nullable=False) for name, length in _USAGE_STRINGS.items()),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_nano_usd", sa.BigInteger(), nullable=False),
        sa.Column("saved_cost_nano_usd", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("ttft_ms", sa.Float()),
        sa.Column("cache_hit", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_usage_records"),
    )
    op.create_index("ix_usage_records_time", "usage_records", ["time"])
    op.create_index("ix_usage_records_key_id_time", "usage_records", ["key_id", "time"])
    op.create_index("ix_usage_records_team_id_time", "usage_records", ["team_id", "time"])


def downgrade() -> None:
    """Drops the three tables."""
    op.drop_table("usage_records")
    op.drop_table("api_keys")
    op.drop_table("teams")
