"""Approvals bound to a payload hash: single use, expiring, with their deciders.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from agent_ledger._migrate import naming

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.JSON(none_as_null=False).with_variant(postgresql.JSONB(none_as_null=False), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    prefix, schema = naming()
    table = f"{prefix}approvals"
    op.create_table(
        table,
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("key", sa.String(80), nullable=False),
        sa.Column("workflow_id", sa.String(255), nullable=False),
        sa.Column("tool", sa.String(255), nullable=False),
        sa.Column("payload_hash", sa.String(80), nullable=False),
        sa.Column("args", _json(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("approvers", _json(), nullable=True),
        sa.Column("requested_at", _ts(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=False),
        sa.Column("decided_at", _ts(), nullable=True),
        sa.Column("decided_by", sa.String(255), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("consumed_at", _ts(), nullable=True),
        sa.Column("channel_state", _json(), nullable=True),
        schema=schema,
    )
    op.create_index(f"ix_{prefix}approvals_key", table, ["key", "payload_hash", "requested_at"], schema=schema)
    op.create_index(f"ix_{prefix}approvals_status", table, ["status", "expires_at"], schema=schema)
    op.create_index(
        f"ux_{prefix}approvals_pending",
        table,
        ["key", "payload_hash"],
        unique=True,
        schema=schema,
        sqlite_where=sa.text("status = 'pending'"),
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    prefix, schema = naming()
    op.drop_table(f"{prefix}approvals", schema=schema)
