"""reruns: executions.rerun_of and chain_executions.rerun_of

Revision ID: 0010_reruns
Revises: 0009_events
Create Date: 2026-12-07 04:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010_reruns"
down_revision = "0009_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("executions", "chain_executions"):
        op.add_column(table, sa.Column("rerun_of", postgresql.UUID(), nullable=True))
        op.create_foreign_key(
            op.f(f"fk_{table}_rerun_of_{table}"),
            table,
            table,
            ["rerun_of"],
            ["id"],
            ondelete="SET NULL",
        )
        # Deleting a row (retention) looks up the rows that name it, to set them NULL: without
        # an index that is a scan of the table per deleted row. Partial: most rows name none,
        # and a NULL adds no index entry on the submit path.
        op.create_index(
            f"ix_{table}_rerun_of",
            table,
            ["rerun_of"],
            postgresql_where=sa.text("rerun_of IS NOT NULL"),
        )


def downgrade() -> None:
    for table in ("chain_executions", "executions"):
        op.drop_index(f"ix_{table}_rerun_of", table_name=table)
        op.drop_constraint(op.f(f"fk_{table}_rerun_of_{table}"), table, type_="foreignkey")
        op.drop_column(table, "rerun_of")
