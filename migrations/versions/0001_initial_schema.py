"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-21 10:25:27.030034
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organizations")),
        sa.UniqueConstraint("name", name=op.f("uq_organizations_name")),
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("tags", sa.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("capabilities", sa.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("current_version_id", sa.UUID(), nullable=True),
        sa.Column("current_version", sa.String(length=32), nullable=True),
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
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "search",
            postgresql.TSVECTOR(),
            sa.Computed(
                "to_tsvector('simple', name || ' ' || coalesce(description, ''))", persisted=True
            ),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_agents_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
        sa.UniqueConstraint("org_id", "name", name="uq_agents_org_id_name"),
    )
    op.create_index(
        "ix_agents_capabilities", "agents", ["capabilities"], unique=False, postgresql_using="gin"
    )
    op.create_index("ix_agents_org_id_created_at", "agents", ["org_id", "created_at"], unique=False)
    op.create_index(
        "ix_agents_search",
        "agents",
        ["search"],
        unique=False,
        postgresql_using="gin",
    )
    op.create_index("ix_agents_tags", "agents", ["tags"], unique=False, postgresql_using="gin")
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "role IN ('admin', 'developer', 'operator', 'viewer')", name=op.f("ck_api_tokens_role")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_api_tokens_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_index("ix_api_tokens_org_id", "api_tokens", ["org_id"], unique=False)
    op.create_table(
        "agent_versions",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("agent_id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("major", sa.Integer(), nullable=False),
        sa.Column("minor", sa.Integer(), nullable=False),
        sa.Column("patch", sa.Integer(), nullable=False),
        sa.Column("runtime", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("input_schema", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("output_schema", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("timeout_seconds", sa.Integer(), nullable=False),
        sa.Column("retry", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("limits", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("queue", sa.String(length=63), nullable=False),
        sa.Column("capabilities", sa.ARRAY(sa.Text()), nullable=False),
        sa.Column("config", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_agent_versions_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_agent_versions_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_versions")),
        sa.UniqueConstraint("agent_id", "version", name="uq_agent_versions_agent_id_version"),
    )
    # agents and agent_versions point at each other: the agent's side is added once both exist.
    op.create_foreign_key(
        op.f("fk_agents_current_version_id_agent_versions"),
        "agents",
        "agent_versions",
        ["current_version_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.create_index(
        "ix_agent_versions_agent_id_semver",
        "agent_versions",
        ["agent_id", "major", "minor", "patch"],
        unique=False,
    )
    op.create_table(
        "executions",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("agent_id", sa.UUID(), nullable=False),
        sa.Column("version_id", sa.UUID(), nullable=False),
        sa.Column("agent_name", sa.String(length=63), nullable=False),
        sa.Column("agent_version", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.SmallInteger(), server_default="5", nullable=False),
        sa.Column("input", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("output", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("attempt", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default="1", nullable=False),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "queued_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resource_usage", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'timed_out', 'cancelled')",
            name=op.f("ck_executions_status"),
        ),
        sa.CheckConstraint("priority BETWEEN 0 AND 9", name=op.f("ck_executions_priority")),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.id"],
            name=op.f("fk_executions_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_executions_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["agent_versions.id"],
            name=op.f("fk_executions_version_id_agent_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_executions")),
    )
    op.create_index(
        "ix_executions_org_id_agent_id_queued_at",
        "executions",
        ["org_id", "agent_id", sa.literal_column("queued_at DESC")],
        unique=False,
    )
    op.create_index(
        "ix_executions_org_id_queued_at",
        "executions",
        ["org_id", sa.literal_column("queued_at DESC")],
        unique=False,
    )
    op.create_index(
        "ix_executions_org_id_status_queued_at",
        "executions",
        ["org_id", "status", sa.literal_column("queued_at DESC")],
        unique=False,
    )
    op.create_index(
        "ix_executions_running_lease",
        "executions",
        ["lease_until"],
        unique=False,
        postgresql_where=sa.text("status = 'running'"),
    )
    op.create_index(
        "ix_executions_undispatched",
        "executions",
        ["queued_at"],
        unique=False,
        postgresql_where=sa.text("status = 'queued' AND dispatched_at IS NULL"),
    )
    op.create_table(
        "execution_logs",
        sa.Column("execution_id", sa.UUID(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("fields", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
            name=op.f("fk_execution_logs_execution_id_executions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("execution_id", "seq", name=op.f("pk_execution_logs")),
    )


def downgrade() -> None:
    op.drop_table("execution_logs")
    op.drop_index(
        "ix_executions_undispatched",
        table_name="executions",
        postgresql_where=sa.text("status = 'queued' AND dispatched_at IS NULL"),
    )
    op.drop_index(
        "ix_executions_running_lease",
        table_name="executions",
        postgresql_where=sa.text("status = 'running'"),
    )
    op.drop_index("ix_executions_org_id_status_queued_at", table_name="executions")
    op.drop_index("ix_executions_org_id_queued_at", table_name="executions")
    op.drop_index("ix_executions_org_id_agent_id_queued_at", table_name="executions")
    op.drop_table("executions")
    op.drop_index("ix_agent_versions_agent_id_semver", table_name="agent_versions")
    op.drop_constraint(
        op.f("fk_agents_current_version_id_agent_versions"), "agents", type_="foreignkey"
    )
    op.drop_table("agent_versions")
    op.drop_index("ix_api_tokens_org_id", table_name="api_tokens")
    op.drop_table("api_tokens")
    op.drop_index("ix_agents_tags", table_name="agents", postgresql_using="gin")
    op.drop_index("ix_agents_search", table_name="agents", postgresql_using="gin")
    op.drop_index("ix_agents_org_id_created_at", table_name="agents")
    op.drop_index("ix_agents_capabilities", table_name="agents", postgresql_using="gin")
    op.drop_table("agents")
    op.drop_table("organizations")
