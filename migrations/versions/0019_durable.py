"""durable agents: the status `waiting`, child executions and the journal of durable calls

Revision ID: 0019_durable
Revises: 0018_tokens_catalog
Create Date: 2026-12-07 13:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0019_durable"
down_revision = "0018_tokens_catalog"
branch_labels = None
depends_on = None

OLD_STATUSES = "('queued', 'running', 'succeeded', 'failed', 'timed_out', 'cancelled')"
NEW_STATUSES = "('queued', 'running', 'waiting', 'succeeded', 'failed', 'timed_out', 'cancelled')"

# A child's end is written into its parent's journal, and wakes the parent when that was the
# last child it waits for, by the statement that ends the child, whichever it is (a worker's
# finish, a cancel, the sweeper failing a lost attempt): no path can end a child and forget its
# parent. The parent's row is locked first: a parent that suspends locks its own row before it
# reads the journal (app/executions/waiting.py), so the two cannot miss each other.
CHILD_ENDED = """
CREATE FUNCTION runyard_child_ended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM executions WHERE id = NEW.parent_execution_id FOR UPDATE;
    UPDATE execution_journal
    SET status = NEW.status, at = now(),
        result = jsonb_build_object('output', NEW.output, 'error', NEW.error)
    WHERE child_execution_id = NEW.id AND status = 'pending';
    UPDATE executions p
    SET status = 'queued', resuming = true, resumes = p.resumes + 1, dispatched_at = NULL,
        wake_at = NULL, awaiting = NULL,
        -- A parent a limit applies to waits for its slot again (app/executions/gates.py).
        waiting_for = CASE WHEN p.gated THEN 'org_max_running' END
    WHERE p.id = NEW.parent_execution_id AND p.status = 'waiting'
      AND NEW.id = ANY(p.awaiting)
      AND NOT EXISTS (
          SELECT 1 FROM execution_journal j
          WHERE j.execution_id = p.id AND j.child_execution_id = ANY(p.awaiting)
            AND j.status = 'pending');
    RETURN NULL;
END $$
"""


def upgrade() -> None:
    op.drop_constraint(op.f("ck_executions_status"), "executions", type_="check")
    op.create_check_constraint(
        op.f("ck_executions_status"), "executions", f"status IN {NEW_STATUSES}"
    )
    op.drop_constraint(op.f("ck_execution_attempts_status"), "execution_attempts", type_="check")
    op.create_check_constraint(
        op.f("ck_execution_attempts_status"), "execution_attempts", f"status IN {NEW_STATUSES}"
    )
    op.add_column("executions", sa.Column("parent_execution_id", sa.Uuid()))
    op.create_foreign_key(
        op.f("fk_executions_parent_execution_id_executions"),
        "executions",
        "executions",
        ["parent_execution_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.add_column(
        "executions",
        sa.Column("depth", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "executions",
        sa.Column("resuming", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.add_column(
        "executions",
        sa.Column("resumes", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column("executions", sa.Column("wake_at", sa.DateTime(timezone=True)))
    op.add_column("executions", sa.Column("awaiting", postgresql.ARRAY(sa.Uuid())))
    op.create_index(
        "ix_executions_parent_execution_id",
        "executions",
        ["parent_execution_id"],
        postgresql_where=sa.text("parent_execution_id IS NOT NULL"),
    )
    op.create_index(
        "ix_executions_waiting_wake_at",
        "executions",
        ["wake_at"],
        postgresql_where=sa.text("status = 'waiting'"),
    )
    op.create_table(
        "execution_journal",
        sa.Column("execution_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("result", postgresql.JSONB(astext_type=sa.Text())),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("child_execution_id", sa.Uuid()),
        sa.Column("due_at", sa.DateTime(timezone=True)),
        sa.Column("match", postgresql.JSONB(astext_type=sa.Text())),
        sa.CheckConstraint(
            "kind IN ('step', 'child', 'sleep', 'event')", name=op.f("ck_execution_journal_kind")
        ),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
            name=op.f("fk_execution_journal_execution_id_executions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["child_execution_id"],
            ["executions.id"],
            name=op.f("fk_execution_journal_child_execution_id_executions"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("execution_id", "seq", name=op.f("pk_execution_journal")),
    )
    op.create_index(
        "ix_execution_journal_child_execution_id",
        "execution_journal",
        ["child_execution_id"],
        unique=True,
        postgresql_where=sa.text("child_execution_id IS NOT NULL"),
    )
    # The waits an event may resume: pending event waits of an organization, by name.
    op.create_index(
        "ix_execution_journal_pending_events",
        "execution_journal",
        ["org_id", "name"],
        postgresql_where=sa.text("kind = 'event' AND status = 'pending'"),
    )
    op.create_table(
        "execution_tokens",
        sa.Column("execution_id", sa.Uuid(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
            name=op.f("fk_execution_tokens_execution_id_executions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("execution_id", name=op.f("pk_execution_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_execution_tokens_token_hash")),
    )
    op.execute(CHILD_ENDED)
    op.execute(
        "CREATE TRIGGER executions_child_ended AFTER UPDATE OF status ON executions "
        "FOR EACH ROW WHEN (NEW.parent_execution_id IS NOT NULL "
        "AND NEW.status IN ('succeeded', 'failed', 'timed_out', 'cancelled') "
        "AND OLD.status NOT IN ('succeeded', 'failed', 'timed_out', 'cancelled')) "
        "EXECUTE FUNCTION runyard_child_ended()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER executions_child_ended ON executions")
    op.execute("DROP FUNCTION runyard_child_ended()")
    op.drop_table("execution_tokens")
    op.drop_index("ix_execution_journal_pending_events", table_name="execution_journal")
    op.drop_index("ix_execution_journal_child_execution_id", table_name="execution_journal")
    op.drop_table("execution_journal")
    op.drop_index("ix_executions_waiting_wake_at", table_name="executions")
    op.drop_index("ix_executions_parent_execution_id", table_name="executions")
    for column in ("awaiting", "wake_at", "resumes", "resuming", "depth"):
        op.drop_column("executions", column)
    op.drop_constraint(
        op.f("fk_executions_parent_execution_id_executions"), "executions", type_="foreignkey"
    )
    op.drop_column("executions", "parent_execution_id")
    op.execute("UPDATE executions SET status = 'cancelled' WHERE status = 'waiting'")
    op.drop_constraint(op.f("ck_execution_attempts_status"), "execution_attempts", type_="check")
    op.create_check_constraint(
        op.f("ck_execution_attempts_status"), "execution_attempts", f"status IN {OLD_STATUSES}"
    )
    op.drop_constraint(op.f("ck_executions_status"), "executions", type_="check")
    op.create_check_constraint(
        op.f("ck_executions_status"), "executions", f"status IN {OLD_STATUSES}"
    )
