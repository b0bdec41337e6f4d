"""events sent to an organization, and triggers that start a target on an event

Revision ID: 0022_events
Revises: 0021_documents
Create Date: 2026-12-08 09:00:00.000000

`events` keeps what POST /api/v1/events accepted: what it resumed and started, and a
`dedupe_key` (the sender's id) that is unique per organization while it is set. Housekeeping
clears the key once the event is 24 hours old (the same id is accepted again) and deletes
events past RUNYARD_EVENT_RETENTION_DAYS.

A trigger is either a webhook (a sealed `secret`, POST /hooks/<id>) or an event trigger
(`event_name`, an optional `event_filter`, no secret): exactly one of the two.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0022_events"
down_revision = "0021_documents"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column(
            "resumed",
            postgresql.ARRAY(sa.Uuid()),
            server_default=sa.text("'{}'"),
            nullable=False,
        ),
        sa.Column(
            "started",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("dedupe_key", sa.Text(), nullable=True),
        sa.Column("created_by_token_id", sa.Uuid(), nullable=True),
        sa.Column("created_by_token_name", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_events_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.UniqueConstraint("org_id", "dedupe_key", name="uq_events_org_id_dedupe_key"),
    )
    # ctx.wait_for_event(lookback_seconds=...) and GET /events?name=...: recent events by name.
    op.create_index(
        "ix_events_org_id_name_received_at",
        "events",
        ["org_id", "name", sa.text("received_at DESC")],
        unique=False,
    )
    # GET /events: the organization's newest first.
    op.create_index(
        "ix_events_org_id_received_at",
        "events",
        ["org_id", sa.text("received_at DESC")],
        unique=False,
    )
    # Housekeeping, over every organization: events past retention, and keys past their 24
    # hours (only the rows whose key is still set: the others are no work to walk past).
    op.create_index("ix_events_received_at", "events", ["received_at"], unique=False)
    op.create_index(
        "ix_events_deduping_received_at",
        "events",
        ["received_at"],
        unique=False,
        postgresql_where=sa.text("dedupe_key IS NOT NULL"),
    )

    op.alter_column("triggers", "secret", existing_type=sa.Text(), nullable=True)
    op.add_column("triggers", sa.Column("event_name", sa.Text(), nullable=True))
    op.add_column(
        "triggers",
        sa.Column("event_filter", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.create_check_constraint(
        op.f("ck_triggers_one_source"),
        "triggers",
        "(secret IS NULL) <> (event_name IS NULL)",
    )
    op.create_index(
        "ix_triggers_org_id_event_name",
        "triggers",
        ["org_id", "event_name"],
        unique=False,
        postgresql_where=sa.text("event_name IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_triggers_org_id_event_name", table_name="triggers")
    op.drop_constraint(op.f("ck_triggers_one_source"), "triggers", type_="check")
    # The code before this revision knows webhook triggers only.
    op.execute("DELETE FROM triggers WHERE event_name IS NOT NULL")
    op.drop_column("triggers", "event_filter")
    op.drop_column("triggers", "event_name")
    op.alter_column("triggers", "secret", existing_type=sa.Text(), nullable=False)
    op.drop_index("ix_events_deduping_received_at", table_name="events")
    op.drop_index("ix_events_received_at", table_name="events")
    op.drop_index("ix_events_org_id_received_at", table_name="events")
    op.drop_index("ix_events_org_id_name_received_at", table_name="events")
    op.drop_table("events")
