"""chains: definitions, versions, chain executions; executions gain their chain step

Revision ID: 0003_chains
Revises: 0002_runtimes
Create Date: 2026-11-21 11:33:53.990801
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003_chains"
down_revision = "0002_runtimes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chains",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
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
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_chains_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chains")),
        sa.UniqueConstraint("org_id", "name", name="uq_chains_org_id_name"),
    )
    op.create_index("ix_chains_org_id_created_at", "chains", ["org_id", "created_at"], unique=False)
    op.create_table(
        "chain_versions",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("chain_id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("major", sa.Integer(), nullable=False),
        sa.Column("minor", sa.Integer(), nullable=False),
        sa.Column("patch", sa.Integer(), nullable=False),
        sa.Column("input_schema", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("steps", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("on_failure", sa.String(length=16), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["chain_id"],
            ["chains.id"],
            name=op.f("fk_chain_versions_chain_id_chains"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_chain_versions_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chain_versions")),
        sa.UniqueConstraint("chain_id", "version", name="uq_chain_versions_chain_id_version"),
    )
    # chains and chain_versions point at each other: the chain's side is added once both exist.
    op.create_foreign_key(
        op.f("fk_chains_current_version_id_chain_versions"),
        "chains",
        "chain_versions",
        ["current_version_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.create_index(
        "ix_chain_versions_chain_id_semver",
        "chain_versions",
        ["chain_id", "major", "minor", "patch"],
        unique=False,
    )
    op.create_table(
        "chain_executions",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("org_id", sa.UUID(), nullable=False),
        sa.Column("chain_id", sa.UUID(), nullable=False),
        sa.Column("chain_version_id", sa.UUID(), nullable=False),
        sa.Column("chain_name", sa.String(length=63), nullable=False),
        sa.Column("chain_version", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.SmallInteger(), server_default="5", nullable=False),
        sa.Column("input", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("output", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("step_versions", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("compensate_versions", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("compensation", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "queued_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resume_checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'compensating', 'succeeded', 'failed', 'cancelled')",
            name=op.f("ck_chain_executions_status"),
        ),
        sa.CheckConstraint("priority BETWEEN 0 AND 9", name=op.f("ck_chain_executions_priority")),
        sa.ForeignKeyConstraint(
            ["chain_id"],
            ["chains.id"],
            name=op.f("fk_chain_executions_chain_id_chains"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["chain_version_id"],
            ["chain_versions.id"],
            name=op.f("fk_chain_executions_chain_version_id_chain_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_chain_executions_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chain_executions")),
    )
    op.create_index(
        "ix_chain_executions_active",
        "chain_executions",
        ["queued_at"],
        unique=False,
        postgresql_where=sa.text("status IN ('queued', 'running', 'compensating')"),
    )
    op.create_index(
        "ix_chain_executions_org_id_queued_at",
        "chain_executions",
        ["org_id", sa.literal_column("queued_at DESC")],
        unique=False,
    )
    # Nullable columns without defaults: adding them rewrites nothing.
    op.add_column("executions", sa.Column("chain_execution_id", sa.UUID(), nullable=True))
    op.add_column("executions", sa.Column("chain_step", sa.SmallInteger(), nullable=True))
    op.add_column("executions", sa.Column("chain_stage", sa.SmallInteger(), nullable=True))
    op.add_column("executions", sa.Column("chain_role", sa.String(length=16), nullable=True))
    op.create_index(
        "ix_executions_chain_execution_id_chain_stage",
        "executions",
        ["chain_execution_id", "chain_stage"],
        unique=False,
        postgresql_where=sa.text("chain_execution_id IS NOT NULL"),
    )
    op.create_foreign_key(
        op.f("fk_executions_chain_execution_id_chain_executions"),
        "executions",
        "chain_executions",
        ["chain_execution_id"],
        ["id"],
        ondelete="CASCADE",
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("fk_executions_chain_execution_id_chain_executions"), "executions", type_="foreignkey"
    )
    op.drop_index(
        "ix_executions_chain_execution_id_chain_stage",
        table_name="executions",
        postgresql_where=sa.text("chain_execution_id IS NOT NULL"),
    )
    op.drop_column("executions", "chain_role")
    op.drop_column("executions", "chain_stage")
    op.drop_column("executions", "chain_step")
    op.drop_column("executions", "chain_execution_id")
    op.drop_index("ix_chain_executions_org_id_queued_at", table_name="chain_executions")
    op.drop_index(
        "ix_chain_executions_active",
        table_name="chain_executions",
        postgresql_where=sa.text("status IN ('queued', 'running', 'compensating')"),
    )
    op.drop_table("chain_executions")
    op.drop_index("ix_chain_versions_chain_id_semver", table_name="chain_versions")
    op.drop_constraint(
        op.f("fk_chains_current_version_id_chain_versions"), "chains", type_="foreignkey"
    )
    op.drop_table("chain_versions")
    op.drop_index("ix_chains_org_id_created_at", table_name="chains")
    op.drop_table("chains")
