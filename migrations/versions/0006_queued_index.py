"""queued executions by age: the sweeper's scans for messages the broker lost

Revision ID: 0006_queued_index
Revises: 0005_idempotency
Create Date: 2026-11-21 15:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_queued_index"
down_revision = "0005_idempotency"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_executions_queued",
        "executions",
        ["queued_at", "id"],
        unique=False,
        postgresql_where=sa.text("status = 'queued'"),
    )


def downgrade() -> None:
    op.drop_index("ix_executions_queued", table_name="executions")
