from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, now_column, uuid_pk

EVENT_TYPES = (
    "execution.succeeded",
    "execution.failed",
    "execution.timed_out",
    "execution.cancelled",
    "chain.succeeded",
    "chain.failed",
    "schedule.paused",
    "quota.exceeded",
)
DELIVERY_STATUSES = ("pending", "delivered", "failed")


class Notification(Base):
    """A subscription: the events of an organization POSTed, signed, to a URL. The signing
    secret is sealed at rest (app/secrets/crypto.py, `notification:<id>` as associated data);
    it is shown once, at creation."""

    __tablename__ = "notifications"
    __table_args__ = (
        UniqueConstraint("org_id", "name", name="uq_notifications_org_id_name"),
        # The writers' join (app/outbox.py): one probe of this index per state change, empty
        # for an organization without subscriptions.
        Index("ix_notifications_org_id", "org_id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(ARRAY(String(32)))
    # filter.agents, as given (names) and as matched (ids); NULL: every agent.
    agent_names: Mapped[list[str] | None] = mapped_column(ARRAY(String(63)))
    agent_ids: Mapped[list[uuid.UUID] | None] = mapped_column(ARRAY(UUID(as_uuid=True)))
    secret: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = now_column()
    updated_at: Mapped[dt.datetime] = now_column()


class NotificationEvent(Base):
    """The outbox: one row per event and subscription, written in the transaction that changed
    the state, and its delivery's progress. `data` is the object as the API shows it; for the
    events of an execution, a chain execution or a schedule it is built from `subject_id` at
    the first delivery attempt (the finish statement writes ids only) and kept from then on."""

    __tablename__ = "notification_events"
    __table_args__ = (
        CheckConstraint(f"status IN {DELIVERY_STATUSES!r}", name="status"),
        # The delivery log, newest first.
        Index(
            "ix_notification_events_notification_id_created_at",
            "notification_id",
            text("created_at DESC"),
        ),
        # What is due: pending rows only.
        Index(
            "ix_notification_events_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(
        primary_key=True, server_default=text("gen_random_uuid()")
    )
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    notification_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("notifications.id", ondelete="CASCADE")
    )
    type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[uuid.UUID | None]
    data: Mapped[dict[str, Any] | None]
    status: Mapped[str] = mapped_column(String(16), server_default=text("'pending'"))
    attempts: Mapped[int] = mapped_column(server_default=text("0"))
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[dt.datetime] = now_column()
    delivered_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = now_column()
    # Retried until RUNYARD_NOTIFY_RETRY_WINDOW_SECONDS after this: the creation, or the last
    # redeliver.
    retry_from: Mapped[dt.datetime] = now_column()


class NotificationTotal(Base):
    """Deliveries that ended, by status, counted as they end: runyard_notifications_total
    reads these, so it never goes down when a redeliver or retention changes the events."""

    __tablename__ = "notification_totals"
    __table_args__ = (CheckConstraint("status IN ('delivered', 'failed')", name="status"),)

    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    events: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
