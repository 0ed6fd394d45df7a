"""Ids of signed inbound decisions already processed, so a replayed webhook is refused.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from agent_ledger._migrate import naming

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    prefix, schema = naming()
    op.create_table(
        f"{prefix}inbound",
        sa.Column("message_id", sa.String(255), primary_key=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        schema=schema,
    )


def downgrade() -> None:
    prefix, schema = naming()
    op.drop_table(f"{prefix}inbound", schema=schema)
