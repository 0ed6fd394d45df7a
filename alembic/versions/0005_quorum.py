"""Quorum approvals: how many approvals a request needs, who approved it so far, on whose behalf it was
made, and one row per vote (unique per approval and approver).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from agent_ledger._migrate import naming

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.JSON(none_as_null=False).with_variant(postgresql.JSONB(none_as_null=False), "postgresql")


def upgrade() -> None:
    prefix, schema = naming()
    with op.batch_alter_table(f"{prefix}approvals", schema=schema) as batch:
        batch.add_column(sa.Column("quorum", sa.Integer(), nullable=False, server_default=sa.text("1")))
        batch.add_column(sa.Column("approved_count", sa.Integer(), nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("approved_by", _json(), nullable=True))
        batch.add_column(sa.Column("requested_by", sa.String(255), nullable=True))
    op.create_table(
        f"{prefix}approval_votes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("approval_id", sa.String(40), nullable=False),
        sa.Column("approver", sa.String(255), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("approval_id", "approver", name=f"uq_{prefix}approval_votes_approver"),
        schema=schema,
    )


def downgrade() -> None:
    prefix, schema = naming()
    op.drop_table(f"{prefix}approval_votes", schema=schema)
    with op.batch_alter_table(f"{prefix}approvals", schema=schema) as batch:
        batch.drop_column("requested_by")
        batch.drop_column("approved_by")
        batch.drop_column("approved_count")
        batch.drop_column("quorum")
