"""tokens over the API (last_used_at) and the catalog (agents' visibility and catalog_runs)

Revision ID: 0018_tokens_catalog
Revises: 0017_versions
Create Date: 2026-12-07 10:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018_tokens_catalog"
down_revision = "0017_versions"
branch_labels = None
depends_on = None


# The tally's tables are keyed by organization as well as agent: a run through the catalog is
# counted for the organization that ran it, in rows of its own, apart from the owner's.
STATS_KEYS = {
    "agent_stats_rollups": ["agent_id", "span_seconds", "bucket_start"],
    "execution_totals": ["agent_id", "queue", "status"],
    "submission_totals": ["agent_id"],
}


def _rekey(table: str, columns: list[str]) -> None:
    op.drop_constraint(f"pk_{table}", table, type_="primary")
    op.create_primary_key(f"pk_{table}", table, columns)


def upgrade() -> None:
    for table, key in STATS_KEYS.items():
        _rekey(table, [*key, "org_id"])
    op.add_column("api_tokens", sa.Column("last_used_at", sa.DateTime(timezone=True)))
    op.add_column(
        "agents",
        sa.Column("visibility", sa.String(length=16), server_default="private", nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_agents_visibility"), "agents", "visibility IN ('private', 'public')"
    )
    op.add_column(
        "agents",
        sa.Column("catalog_runs", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )
    # GET /catalog: the public, live agents of every organization, newest first.
    op.create_index(
        "ix_agents_catalog",
        "agents",
        [sa.text("created_at DESC"), "id"],
        unique=False,
        postgresql_where=sa.text("visibility = 'public' AND archived_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_agents_catalog", table_name="agents")
    op.drop_column("agents", "catalog_runs")
    op.drop_constraint(op.f("ck_agents_visibility"), "agents", type_="check")
    op.drop_column("agents", "visibility")
    op.drop_column("api_tokens", "last_used_at")
    for table, key in STATS_KEYS.items():
        # Rows of the same agent by several organizations become one again.
        op.execute(f"DELETE FROM {table}")
        _rekey(table, key)
