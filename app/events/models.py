from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import ForeignKey, Index, Text, UniqueConstraint, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.audit.models import CreatedBy
from app.db import Base, now_column, uuid_pk


class Event(CreatedBy, Base):
    """An event POST /api/v1/events accepted, with what it resumed and started.

    `event_id` is the sender's `id` (a generated UUID when it sent none); `dedupe_key` holds
    the sender's id while it still deduplicates: unique per organization while set, cleared by
    housekeeping (or by the next event with the same id) once the event is 24 hours old."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("org_id", "dedupe_key", name="uq_events_org_id_dedupe_key"),
        Index("ix_events_org_id_name_received_at", "org_id", "name", text("received_at DESC")),
        Index("ix_events_org_id_received_at", "org_id", text("received_at DESC")),
        Index("ix_events_received_at", "received_at"),
        Index(
            "ix_events_deduping_received_at",
            "received_at",
            postgresql_where=text("dedupe_key IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]]
    received_at: Mapped[dt.datetime] = now_column()
    resumed: Mapped[list[uuid.UUID]] = mapped_column(
        ARRAY(UUID(as_uuid=True)), server_default=text("'{}'")
    )
    started: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    dedupe_key: Mapped[str | None] = mapped_column(Text)
