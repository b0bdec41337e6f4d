"""agents' wallets, their spending policy and the decisions their transfers make

Revision ID: 0024_wallets
Revises: 0023_capabilities
Create Date: 2026-12-07 18:00:00.000000

`agent_wallets`: an agent's one wallet, made by the wallet service. `decisions`: one per
transfer an agent asked for, with how its policy judged it and what became of it; unique per
execution and step key, so a replayed attempt finds the decision it made. A decision outlives
its execution (ON DELETE SET NULL: retention never takes it) and its agent (`agent_name`).
`agent_versions.wallet_policy`: the versioned spending policy (NULL: transfers refused).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0024_wallets"
down_revision = "0023_capabilities"
branch_labels = None
depends_on = None

STATUSES = ("refused", "awaiting_approval", "rejected", "queued", "sent", "mined", "errored")


def upgrade() -> None:
    op.add_column(
        "agent_versions",
        sa.Column("wallet_policy", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.create_table(
        "agent_wallets",
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("address", sa.String(length=128), nullable=False),
        sa.Column("label", sa.Text(), nullable=True),
        sa.Column("provider", sa.String(length=32), server_default="engine", nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("created_by_token_id", sa.Uuid(), nullable=True),
        sa.Column("created_by_token_name", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_agent_wallets_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_agent_wallets_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("agent_id", name=op.f("pk_agent_wallets")),
    )
    op.create_index("ix_agent_wallets_org_id", "agent_wallets", ["org_id"])
    op.create_table(
        "decisions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("agent_id", sa.Uuid(), nullable=True),
        sa.Column("agent_name", sa.String(length=63), nullable=False),
        sa.Column("execution_id", sa.Uuid(), nullable=True),
        sa.Column("step_key", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(length=16), server_default="transfer", nullable=False),
        sa.Column("chain", sa.Text(), nullable=False),
        sa.Column("to_address", sa.Text(), nullable=False),
        sa.Column("amount", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("policy_check", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("queue_id", sa.Text(), nullable=True),
        # When the first send to the wallet service began: the service keeps an idempotency
        # key 24 hours, so a send not recorded by then is not tried again (app/wallets).
        sa.Column("send_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("transaction_hash", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("approved_by", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint(f"status IN {STATUSES!r}", name=op.f("ck_decisions_status")),
        sa.CheckConstraint("kind = 'transfer'", name=op.f("ck_decisions_kind")),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_decisions_agent_id_agents"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
            name=op.f("fk_decisions_execution_id_executions"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_decisions_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_decisions")),
        sa.UniqueConstraint(
            "execution_id", "step_key", name=op.f("uq_decisions_execution_id_step_key")
        ),
    )
    op.create_index("ix_decisions_org_id_created_at", "decisions", ["org_id", "created_at"])
    op.create_index("ix_decisions_agent_id_created_at", "decisions", ["agent_id", "created_at"])


def downgrade() -> None:
    op.drop_table("decisions")
    op.drop_table("agent_wallets")
    op.drop_column("agent_versions", "wallet_policy")
