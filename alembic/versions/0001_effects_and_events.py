"""Effects (one row per key) and the append-only audit events table.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from agent_ledger._migrate import naming

revision = "0001"
down_revision = None
branch_labels = ("agent_ledger",)
depends_on = None


def _json() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.JSON(none_as_null=False).with_variant(postgresql.JSONB(none_as_null=False), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    prefix, schema = naming()
    if schema and op.get_bind().dialect.name == "postgresql":
        op.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
    op.create_table(
        f"{prefix}effects",
        sa.Column("key", sa.String(80), primary_key=True),
        sa.Column("workflow_id", sa.String(255), nullable=False),
        sa.Column("tool", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("payload_hash", sa.String(80), nullable=False),
        sa.Column("args", _json(), nullable=False),
        sa.Column("result", _json(), nullable=True),
        sa.Column("result_replayable", sa.Boolean, nullable=True),
        sa.Column("result_repr", sa.Text, nullable=True),
        sa.Column("error", _json(), nullable=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", _ts(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("started_at", _ts(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        schema=schema,
    )
    op.create_index(f"ix_{prefix}effects_workflow", f"{prefix}effects", ["workflow_id", "created_at"], schema=schema)
    op.create_index(
        f"ix_{prefix}effects_status_lease", f"{prefix}effects", ["status", "lease_expires_at"], schema=schema
    )
    op.create_table(
        f"{prefix}events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(80), nullable=False),
        sa.Column("workflow_id", sa.String(255), nullable=False),
        sa.Column("tool", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("at", _ts(), nullable=False),
        sa.Column("detail", _json(), nullable=True),
        schema=schema,
    )
    op.create_index(f"ix_{prefix}events_key", f"{prefix}events", ["key", "id"], schema=schema)
    op.create_index(f"ix_{prefix}events_workflow", f"{prefix}events", ["workflow_id", "at"], schema=schema)


def downgrade() -> None:
    prefix, schema = naming()
    op.drop_table(f"{prefix}events", schema=schema)
    op.drop_table(f"{prefix}effects", schema=schema)
