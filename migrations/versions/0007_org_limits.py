"""organization limits (quotas checked when work is submitted), and executions by finish time

Revision ID: 0007_org_limits
Revises: 0006_queued_index
Create Date: 2026-12-07 00:15:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_org_limits"
down_revision = "0006_queued_index"
branch_labels = None
depends_on = None

LIMITS = (
    ("max_running", sa.Integer()),
    ("max_queued", sa.Integer()),
    ("submit_rate", sa.Float()),
    ("submit_burst", sa.Integer()),
    ("cpu_seconds_per_day", sa.Float()),
)


def upgrade() -> None:
    for name, column_type in LIMITS:
        op.add_column("organizations", sa.Column(name, column_type, nullable=True))
        op.create_check_constraint(
            op.f(f"ck_organizations_{name}"), "organizations", f"{name} IS NULL OR {name} > 0"
        )
    op.add_column(
        "organizations",
        sa.Column("weight", sa.Integer(), server_default=sa.text("1"), nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_organizations_weight"), "organizations", "weight BETWEEN 1 AND 1000"
    )
    # Chain runs not started yet count against max_queued.
    op.create_index(
        "ix_chain_executions_org_id_not_started",
        "chain_executions",
        ["org_id"],
        unique=False,
        postgresql_where=sa.text("status = 'queued'"),
    )
    # The CPU an organization's executions used today (cpu_seconds_per_day).
    op.create_index(
        "ix_executions_org_id_finished_at",
        "executions",
        ["org_id", "finished_at"],
        unique=False,
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_executions_org_id_finished_at", table_name="executions")
    op.drop_index("ix_chain_executions_org_id_not_started", table_name="chain_executions")
    op.drop_constraint(op.f("ck_organizations_weight"), "organizations", type_="check")
    op.drop_column("organizations", "weight")
    for name, _column_type in reversed(LIMITS):
        op.drop_constraint(op.f(f"ck_organizations_{name}"), "organizations", type_="check")
        op.drop_column("organizations", name)
