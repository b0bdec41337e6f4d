"""logs across executions (execution_logs.org_id and its index) and retention (per-organization
retention_days, chain executions by finish time)

Revision ID: 0012_logs
Revises: 0011_notifications
Create Date: 2026-12-07 04:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_logs"
down_revision = "0011_notifications"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("organizations", sa.Column("retention_days", sa.Integer(), nullable=True))
    op.create_check_constraint(
        op.f("ck_organizations_retention_days"),
        "organizations",
        "retention_days IS NULL OR retention_days > 0",
    )
    # The organization of each line, copied from its execution when the line is written, so
    # that GET /logs walks one organization's lines newest first through one index instead of
    # every organization's. No foreign key: its check would cost every inserted line, and the
    # lines go with their execution (the trigger below).
    op.add_column("execution_logs", sa.Column("org_id", sa.Uuid(), nullable=True))
    op.execute(
        "UPDATE execution_logs l SET org_id = e.org_id "
        "FROM executions e WHERE e.id = l.execution_id"
    )
    op.alter_column("execution_logs", "org_id", nullable=False)
    op.create_index("ix_execution_logs_org_id_ts", "execution_logs", ["org_id", sa.text("ts DESC")])
    # The lines follow their execution out by a trigger instead of a foreign key: the key's check
    # of every inserted line was most of the insert's time (bench/logs.py: about 8 of 19 ms a
    # 1,000-line batch), and the insert's join to its execution (the fencing) already checks
    # that it exists. One statement-level trigger a DELETE on executions, cascades included.
    op.drop_constraint(
        op.f("fk_execution_logs_execution_id_executions"), "execution_logs", type_="foreignkey"
    )
    op.execute(
        """
        CREATE FUNCTION execution_logs_follow_executions() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM execution_logs l USING gone WHERE l.execution_id = gone.id;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER execution_logs_follow_executions AFTER DELETE ON executions
        REFERENCING OLD TABLE AS gone
        FOR EACH STATEMENT EXECUTE FUNCTION execution_logs_follow_executions()
        """
    )
    # Retention deletes finished chain executions (with their steps) by finish time.
    op.create_index(
        "ix_chain_executions_org_id_finished_at",
        "chain_executions",
        ["org_id", "finished_at"],
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_chain_executions_org_id_finished_at", table_name="chain_executions")
    op.execute("DROP TRIGGER execution_logs_follow_executions ON executions")
    op.execute("DROP FUNCTION execution_logs_follow_executions()")
    op.execute(
        "DELETE FROM execution_logs l "
        "WHERE NOT EXISTS (SELECT 1 FROM executions e WHERE e.id = l.execution_id)"
    )
    op.create_foreign_key(
        op.f("fk_execution_logs_execution_id_executions"),
        "execution_logs",
        "executions",
        ["execution_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.drop_index("ix_execution_logs_org_id_ts", table_name="execution_logs")
    op.drop_column("execution_logs", "org_id")
    op.drop_constraint(op.f("ck_organizations_retention_days"), "organizations", type_="check")
    op.drop_column("organizations", "retention_days")
