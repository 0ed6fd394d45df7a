"""Runtime limits: one usage row per budget (limit name, scope) and fixed window.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from agent_ledger._migrate import naming

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    prefix, schema = naming()
    op.create_table(
        f"{prefix}usage",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("scope", sa.String(255), primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used", sa.Double(), nullable=False),
        sa.Column("cap", sa.Double(), nullable=False),
        sa.Column("per", sa.String(16), nullable=False),
        sa.Column("tool", sa.String(255), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        schema=schema,
    )


def downgrade() -> None:
    prefix, schema = naming()
    op.drop_table(f"{prefix}usage", schema=schema)
