"""flow control: agent concurrency and rate limits, waiting executions and their indexes

Revision ID: 0008_flow_control
Revises: 0007_org_limits
Create Date: 2026-12-07 02:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008_flow_control"
down_revision = "0007_org_limits"
branch_labels = None
depends_on = None

WAITING_FOR = ("queue", "org_max_running", "agent_concurrency", "agent_rate_limit")


def upgrade() -> None:
    op.add_column("agent_versions", sa.Column("concurrency", postgresql.JSONB(), nullable=True))
    op.add_column("agent_versions", sa.Column("rate_limit", postgresql.JSONB(), nullable=True))
    op.add_column("executions", sa.Column("queue", sa.String(63), nullable=True))
    op.add_column("executions", sa.Column("waiting_for", sa.String(24), nullable=True))
    op.add_column("executions", sa.Column("flow_key", sa.Text(), nullable=True))
    op.add_column("executions", sa.Column("rate_key", sa.Text(), nullable=True))
    op.add_column(
        "executions",
        sa.Column("gated", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_executions_waiting_for"),
        "executions",
        f"waiting_for IS NULL OR waiting_for IN {WAITING_FOR!r}",
    )
    # An organization's messages in the broker not yet claimed, per queue (the fair window).
    op.create_index(
        "ix_executions_org_id_queue_unclaimed",
        "executions",
        ["org_id", "queue"],
        postgresql_where=sa.text("status = 'queued' AND waiting_for IS NULL"),
    )
    # Executions held back for the fair window, in the order they are let out; and those held
    # back for a limit (apart: a deep backlog of one must not slow the other's probes).
    op.create_index(
        "ix_executions_org_id_queue_waiting",
        "executions",
        ["org_id", "queue", sa.text("priority DESC"), "queued_at"],
        postgresql_where=sa.text("status = 'queued' AND waiting_for = 'queue'"),
    )
    op.create_index(
        "ix_executions_org_id_limit_waiting",
        "executions",
        ["org_id", sa.text("priority DESC"), "queued_at"],
        postgresql_where=sa.text("status = 'queued' AND waiting_for <> 'queue'"),
    )
    # The slots of a concurrency group, and the starts of a rate-limit group.
    op.create_index(
        "ix_executions_agent_id_flow_key_active",
        "executions",
        ["agent_id", "flow_key"],
        postgresql_where=sa.text("flow_key IS NOT NULL AND status IN ('queued', 'running')"),
    )
    op.create_index(
        "ix_executions_agent_id_rate_key_started_at",
        "executions",
        ["agent_id", "rate_key", "started_at"],
        postgresql_where=sa.text("rate_key IS NOT NULL"),
    )
    # The sweeper's rows committed but never published: a held row is neither.
    op.drop_index("ix_executions_undispatched", table_name="executions")
    op.create_index(
        "ix_executions_undispatched",
        "executions",
        ["queued_at"],
        postgresql_where=sa.text(
            "status = 'queued' AND dispatched_at IS NULL AND waiting_for IS NULL"
        ),
    )
    # An organization's running executions (max_running).
    op.create_index(
        "ix_executions_org_id_gated_active",
        "executions",
        ["org_id"],
        postgresql_where=sa.text(
            "gated AND status IN ('queued', 'running') AND waiting_for IS NULL"
        ),
    )


def downgrade() -> None:
    op.drop_index("ix_executions_org_id_gated_active", table_name="executions")
    op.drop_index("ix_executions_undispatched", table_name="executions")
    op.create_index(
        "ix_executions_undispatched",
        "executions",
        ["queued_at"],
        postgresql_where=sa.text("status = 'queued' AND dispatched_at IS NULL"),
    )
    op.drop_index("ix_executions_agent_id_rate_key_started_at", table_name="executions")
    op.drop_index("ix_executions_agent_id_flow_key_active", table_name="executions")
    op.drop_index("ix_executions_org_id_limit_waiting", table_name="executions")
    op.drop_index("ix_executions_org_id_queue_waiting", table_name="executions")
    op.drop_index("ix_executions_org_id_queue_unclaimed", table_name="executions")
    op.drop_constraint(op.f("ck_executions_waiting_for"), "executions", type_="check")
    for column in ("gated", "rate_key", "flow_key", "waiting_for", "queue"):
        op.drop_column("executions", column)
    op.drop_column("agent_versions", "rate_limit")
    op.drop_column("agent_versions", "concurrency")
