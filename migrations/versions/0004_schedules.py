"""schedules, their fire records, webhook triggers and their seen deliveries

Revision ID: 0004_schedules
Revises: 0003_chains
Create Date: 2026-11-21 11:34:16.746365
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004_schedules"
down_revision = "0003_chains"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("target_kind", sa.String(length=8), nullable=False),
        sa.Column("target_name", sa.String(length=63), nullable=False),
        sa.Column("target_version", sa.String(length=32), nullable=True),
        sa.Column("agent_id", sa.UUID(), nullable=True),
        sa.Column("chain_id", sa.UUID(), nullable=True),
        sa.Column("version_id", sa.UUID(), nullable=True),
        sa.Column("cron", sa.String(length=200), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("input", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("overlap", sa.String(length=16), nullable=False),
        sa.Column("catchup", sa.String(length=8), nullable=False),
        sa.Column("catchup_window_seconds", sa.Integer(), nullable=False),
        sa.Column("pause_after_failures", sa.Integer(), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_fire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_fire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_execution_id", sa.UUID(), nullable=True),
        sa.Column("paused_reason", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "catchup IN ('none', 'latest', 'all')", name=op.f("ck_schedules_catchup")
        ),
        sa.CheckConstraint(
            "overlap IN ('skip', 'allow', 'buffer_one', 'cancel_other')",
            name=op.f("ck_schedules_overlap"),
        ),
        sa.CheckConstraint(
            "target_kind IN ('agent', 'chain')", name=op.f("ck_schedules_target_kind")
        ),
        sa.CheckConstraint(
            "(agent_id IS NULL) <> (chain_id IS NULL)", name=op.f("ck_schedules_one_target")
        ),
        sa.ForeignKeyConstraint(
            ["chain_id"],
            ["chains.id"],
            name=op.f("fk_schedules_chain_id_chains"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_schedules_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_schedules_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["agent_versions.id"],
            name=op.f("fk_schedules_version_id_agent_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedules")),
        sa.UniqueConstraint("org_id", "name", name="uq_schedules_org_id_name"),
    )
    op.create_index(
        "ix_schedules_due",
        "schedules",
        ["next_fire_at"],
        unique=False,
        postgresql_where=sa.text("enabled"),
    )
    op.create_index(
        "ix_schedules_org_id_created_at", "schedules", ["org_id", "created_at"], unique=False
    )
    op.create_table(
        "triggers",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("target_kind", sa.String(length=8), nullable=False),
        sa.Column("target_name", sa.String(length=63), nullable=False),
        sa.Column("target_version", sa.String(length=32), nullable=True),
        sa.Column("agent_id", sa.UUID(), nullable=True),
        sa.Column("chain_id", sa.UUID(), nullable=True),
        sa.Column("version_id", sa.UUID(), nullable=True),
        sa.Column("input", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "target_kind IN ('agent', 'chain')", name=op.f("ck_triggers_target_kind")
        ),
        sa.CheckConstraint(
            "(agent_id IS NULL) <> (chain_id IS NULL)", name=op.f("ck_triggers_one_target")
        ),
        sa.ForeignKeyConstraint(
            ["chain_id"],
            ["chains.id"],
            name=op.f("fk_triggers_chain_id_chains"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_triggers_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_triggers_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["agent_versions.id"],
            name=op.f("fk_triggers_version_id_agent_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_triggers")),
        sa.UniqueConstraint("org_id", "name", name="uq_triggers_org_id_name"),
    )
    op.create_index(
        "ix_triggers_org_id_created_at", "triggers", ["org_id", "created_at"], unique=False
    )
    op.create_table(
        "schedule_fires",
        sa.Column("schedule_id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("fire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "fired_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("skipped_reason", sa.Text(), nullable=True),
        sa.Column("execution_id", sa.UUID(), nullable=True),
        sa.Column("chain_execution_id", sa.UUID(), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("fired_by", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "kind IN ('scheduled', 'catchup', 'manual')", name=op.f("ck_schedule_fires_kind")
        ),
        sa.CheckConstraint(
            "status IN ('fired', 'skipped', 'buffered', 'failed')",
            name=op.f("ck_schedule_fires_status"),
        ),
        sa.ForeignKeyConstraint(
            ["schedule_id"],
            ["schedules.id"],
            name=op.f("fk_schedule_fires_schedule_id_schedules"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("schedule_id", "fire_time", name=op.f("pk_schedule_fires")),
    )
    op.create_index(
        "ix_schedule_fires_buffered",
        "schedule_fires",
        ["schedule_id"],
        unique=False,
        postgresql_where=sa.text("status = 'buffered'"),
    )
    op.create_index(
        "ix_schedule_fires_unsettled",
        "schedule_fires",
        ["schedule_id"],
        unique=False,
        postgresql_where=sa.text("status = 'fired' AND outcome IS NULL"),
    )
    op.create_table(
        "trigger_deliveries",
        sa.Column("trigger_id", sa.UUID(), nullable=False),
        sa.Column("signature", sa.String(length=64), nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("execution_id", sa.UUID(), nullable=True),
        sa.ForeignKeyConstraint(
            ["trigger_id"],
            ["triggers.id"],
            name=op.f("fk_trigger_deliveries_trigger_id_triggers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("trigger_id", "signature", name=op.f("pk_trigger_deliveries")),
    )
    op.create_index(
        "ix_trigger_deliveries_trigger_id_received_at",
        "trigger_deliveries",
        ["trigger_id", "received_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_trigger_deliveries_trigger_id_received_at", table_name="trigger_deliveries")
    op.drop_table("trigger_deliveries")
    op.drop_index(
        "ix_schedule_fires_unsettled",
        table_name="schedule_fires",
        postgresql_where=sa.text("status = 'fired' AND outcome IS NULL"),
    )
    op.drop_index(
        "ix_schedule_fires_buffered",
        table_name="schedule_fires",
        postgresql_where=sa.text("status = 'buffered'"),
    )
    op.drop_table("schedule_fires")
    op.drop_index("ix_triggers_org_id_created_at", table_name="triggers")
    op.drop_table("triggers")
    op.drop_index("ix_schedules_org_id_created_at", table_name="schedules")
    op.drop_index("ix_schedules_due", table_name="schedules", postgresql_where=sa.text("enabled"))
    op.drop_table("schedules")
