from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from app.audit.models import CreatedBy
from app.db import Base, now_column, uuid_pk


class Trigger(CreatedBy, Base):
    """Starts its target on a webhook delivery or on an event, exactly one of the two.

    A webhook trigger has a secret, sealed at rest (app/secrets/crypto.py, `trigger:<id>` as
    associated data): checking an HMAC needs it back, so it cannot be hashed; it is shown
    once, at creation, and never again. An event trigger has `event_name` (and maybe an
    `event_filter`: dotted paths in the event's data to the values they must equal) and no
    secret."""

    __tablename__ = "triggers"
    __table_args__ = (
        UniqueConstraint("org_id", "name", name="uq_triggers_org_id_name"),
        CheckConstraint("target_kind IN ('agent', 'chain')", name="target_kind"),
        # Exactly one target: an agent or a chain.
        CheckConstraint("(agent_id IS NULL) <> (chain_id IS NULL)", name="one_target"),
        # Exactly one source: a webhook (its secret) or an event name.
        CheckConstraint("(secret IS NULL) <> (event_name IS NULL)", name="one_source"),
        Index("ix_triggers_org_id_created_at", "org_id", "created_at"),
        Index(
            "ix_triggers_org_id_event_name",
            "org_id",
            "event_name",
            postgresql_where=text("event_name IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    target_kind: Mapped[str] = mapped_column(String(8))
    target_name: Mapped[str] = mapped_column(String(63))
    target_version: Mapped[str | None] = mapped_column(String(32))
    agent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"))
    chain_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("chains.id", ondelete="CASCADE"))
    version_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agent_versions.id"))
    input: Mapped[dict[str, Any]]
    secret: Mapped[str | None] = mapped_column(Text)
    event_name: Mapped[str | None] = mapped_column(Text)
    event_filter: Mapped[dict[str, Any] | None]
    created_at: Mapped[dt.datetime] = now_column()


class TriggerDelivery(Base):
    """Signatures already accepted: a second request with the same one is a replay (401).
    Written in the same transaction as the execution it starts."""

    __tablename__ = "trigger_deliveries"
    __table_args__ = (
        Index("ix_trigger_deliveries_trigger_id_received_at", "trigger_id", "received_at"),
    )

    trigger_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("triggers.id", ondelete="CASCADE"), primary_key=True
    )
    signature: Mapped[str] = mapped_column(String(64), primary_key=True)
    received_at: Mapped[dt.datetime] = now_column()
    # The run it started: an execution, or a chain execution for a chain target.
    execution_id: Mapped[uuid.UUID | None]
