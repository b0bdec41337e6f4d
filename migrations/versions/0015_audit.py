"""audit trail: hash-chained events per organization, and created_by on what tokens make

Revision ID: 0015_audit
Revises: 0014_console
Create Date: 2026-12-07 10:15:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015_audit"
down_revision = "0014_console"
branch_labels = None
depends_on = None

GENESIS = "0" * 64
CREATED_BY_TABLES = (
    "executions",
    "chain_executions",
    "agent_versions",
    "chain_versions",
    "schedules",
    "triggers",
)


def upgrade() -> None:
    # The head of each organization's chain: the last sealed seq and hash, where the sealer
    # takes up the chain (its row lock keeps two sealers of one organization apart).
    op.create_table(
        "audit_heads",
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("hash", sa.String(length=64), server_default=GENESIS, nullable=False),
        sa.Column("prev_hash", sa.String(length=64), server_default=GENESIS, nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_audit_heads_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", name=op.f("pk_audit_heads")),
    )
    # Written by the change's own statement, unnumbered (seq NULL, the body still in two
    # drafted pieces); the sealer numbers and hashes committed events in order (app/audit).
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("object_type", sa.String(length=32), nullable=False),
        sa.Column("object_id", sa.Text(), nullable=True),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("draft_head", sa.Text(), nullable=True),
        sa.Column("draft_mid", sa.Text(), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("hash", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_audit_events_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
        sa.UniqueConstraint("org_id", "seq", name="uq_audit_events_org_id_seq"),
    )
    op.create_index(
        "ix_audit_events_unsealed",
        "audit_events",
        ["org_id", "id"],
        postgresql_where=sa.text("seq IS NULL"),
    )
    op.create_index("ix_audit_events_org_id_action", "audit_events", ["org_id", "action", "seq"])
    op.create_index(
        "ix_audit_events_org_id_object",
        "audit_events",
        ["org_id", "object_type", "object_id", "seq"],
    )
    op.create_index("ix_audit_events_org_id_at", "audit_events", ["org_id", "at"])
    # Every organization has its head from its first moment, whoever creates it.
    op.execute(
        """
        CREATE FUNCTION runyard_audit_head() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO audit_heads (org_id) VALUES (NEW.id);
            RETURN NEW;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER organizations_audit_head AFTER INSERT ON organizations "
        "FOR EACH ROW EXECUTE FUNCTION runyard_audit_head()"
    )
    op.execute("INSERT INTO audit_heads (org_id) SELECT id FROM organizations")
    for table in CREATED_BY_TABLES:
        op.add_column(table, sa.Column("created_by_token_id", sa.Uuid(), nullable=True))
        op.add_column(table, sa.Column("created_by_token_name", sa.Text(), nullable=True))


def downgrade() -> None:
    for table in CREATED_BY_TABLES:
        op.drop_column(table, "created_by_token_name")
        op.drop_column(table, "created_by_token_id")
    op.execute("DROP TRIGGER organizations_audit_head ON organizations")
    op.execute("DROP FUNCTION runyard_audit_head()")
    op.drop_table("audit_events")
    op.drop_table("audit_heads")
