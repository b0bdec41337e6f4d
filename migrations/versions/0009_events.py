"""live events: an execution's progress, its trace context, and who watches it

Revision ID: 0009_events
Revises: 0008_flow_control
Create Date: 2026-12-07 04:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009_events"
down_revision = "0008_flow_control"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # All nullable without a default: adding them rewrites nothing.
    op.add_column("executions", sa.Column("progress", postgresql.JSONB(), nullable=True))
    op.add_column("executions", sa.Column("traceparent", sa.String(55), nullable=True))
    op.add_column(
        "executions", sa.Column("watched_until", sa.DateTime(timezone=True), nullable=True)
    )
    # A chain submit's traceparent, which every step of the chain execution is stored with.
    op.add_column("chain_executions", sa.Column("traceparent", sa.String(55), nullable=True))


def downgrade() -> None:
    op.drop_column("chain_executions", "traceparent")
    op.drop_column("executions", "watched_until")
    op.drop_column("executions", "traceparent")
    op.drop_column("executions", "progress")
