"""structured capabilities, and executions assigned by capability

Revision ID: 0023_capabilities
Revises: 0022_events
Create Date: 2026-12-07 17:00:00.000000

An agent version's `capabilities` become JSONB: each one as the definition gave it, a name
(`"nlp"`) or an object (`{"name", "providers", "chains", "authority"}`). `agents.capabilities`
stays an array of the current version's names, which the GIN index behind `?capability=`
serves. `executions.assigned_by` is set on an execution that POST /api/v1/executions assigned by
capability: `{"capability", "candidates"}`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0023_capabilities"
down_revision = "0022_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE agent_versions ALTER COLUMN capabilities TYPE jsonb "
        "USING to_jsonb(capabilities)"
    )
    op.add_column(
        "executions",
        sa.Column("assigned_by", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("executions", "assigned_by")
    # Objects go back to their names (ALTER ... USING takes no subquery: a column in between).
    op.add_column("agent_versions", sa.Column("names", postgresql.ARRAY(sa.Text()), nullable=True))
    op.execute(
        "UPDATE agent_versions SET names = ARRAY(SELECT CASE jsonb_typeof(c) "
        "WHEN 'string' THEN c #>> '{}' ELSE c ->> 'name' END "
        "FROM jsonb_array_elements(capabilities) AS c)"
    )
    op.drop_column("agent_versions", "capabilities")
    op.alter_column("agent_versions", "names", new_column_name="capabilities", nullable=False)
