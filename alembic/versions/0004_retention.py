"""Per-tool retention: effects may carry the time after which ``prune`` removes them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from agent_ledger._migrate import naming

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    prefix, schema = naming()
    with op.batch_alter_table(f"{prefix}effects", schema=schema) as batch:
        batch.add_column(sa.Column("retain_until", sa.DateTime(timezone=True), nullable=True))
    op.create_index(f"ix_{prefix}effects_retention", f"{prefix}effects", ["retain_until"], schema=schema)


def downgrade() -> None:
    prefix, schema = naming()
    op.drop_index(f"ix_{prefix}effects_retention", f"{prefix}effects", schema=schema)
    with op.batch_alter_table(f"{prefix}effects", schema=schema) as batch:
        batch.drop_column("retain_until")
