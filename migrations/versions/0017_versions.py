"""versions lifecycle: a changelog on agent and chain versions

Revision ID: 0017_versions
Revises: 0016_secrets
Create Date: 2026-12-07 10:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017_versions"
down_revision = "0016_secrets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: adding the columns rewrites no row.
    op.add_column("agent_versions", sa.Column("changelog", sa.Text(), nullable=True))
    op.add_column("chain_versions", sa.Column("changelog", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("chain_versions", "changelog")
    op.drop_column("agent_versions", "changelog")
