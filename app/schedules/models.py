from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.audit.models import CreatedBy
from app.db import Base, now_column, uuid_pk

OVERLAP = ("skip", "allow", "buffer_one", "cancel_other")
CATCHUP = ("none", "latest", "all")
# fired: an execution was created; skipped: a policy said no (skipped_reason says which);
# buffered: waits for the running execution (overlap buffer_one); failed: the target refused
# the run (archived agent, input no longer valid), also in skipped_reason.
FIRE_STATUSES = ("fired", "skipped", "buffered", "failed")
FIRE_KINDS = ("scheduled", "catchup", "manual")


class Schedule(CreatedBy, Base):
    __tablename__ = "schedules"
    __table_args__ = (
        UniqueConstraint("org_id", "name", name="uq_schedules_org_id_name"),
        CheckConstraint(f"overlap IN {OVERLAP!r}", name="overlap"),
        CheckConstraint(f"catchup IN {CATCHUP!r}", name="catchup"),
        CheckConstraint("target_kind IN ('agent', 'chain')", name="target_kind"),
        # Exactly one target: an agent or a chain.
        CheckConstraint("(agent_id IS NULL) <> (chain_id IS NULL)", name="one_target"),
        # What beat asks every tick: the enabled schedules due first.
        Index("ix_schedules_due", "next_fire_at", postgresql_where=text("enabled")),
        Index("ix_schedules_org_id_created_at", "org_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    target_kind: Mapped[str] = mapped_column(String(8))
    target_name: Mapped[str] = mapped_column(String(63))
    target_version: Mapped[str | None] = mapped_column(String(32))
    agent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"))
    chain_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("chains.id", ondelete="CASCADE"))
    # Set only when the target pins a version; otherwise each fire runs the current version.
    version_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agent_versions.id"))
    cron: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64))
    input: Mapped[dict[str, Any]]
    enabled: Mapped[bool] = mapped_column(Boolean)
    overlap: Mapped[str] = mapped_column(String(16))
    catchup: Mapped[str] = mapped_column(String(8))
    catchup_window_seconds: Mapped[int] = mapped_column(Integer)
    pause_after_failures: Mapped[int] = mapped_column(Integer)
    consecutive_failures: Mapped[int] = mapped_column(Integer, server_default="0")
    # NULL while disabled: a paused schedule is never due.
    next_fire_at: Mapped[dt.datetime | None]
    last_fire_at: Mapped[dt.datetime | None]
    last_execution_id: Mapped[uuid.UUID | None]
    paused_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = now_column()
    updated_at: Mapped[dt.datetime] = now_column()


class ScheduleFire(Base):
    """One row per schedule and fire time: the primary key is what makes a fire happen once,
    whatever number of beat processes race for it."""

    __tablename__ = "schedule_fires"
    __table_args__ = (
        CheckConstraint(f"status IN {FIRE_STATUSES!r}", name="status"),
        CheckConstraint(f"kind IN {FIRE_KINDS!r}", name="kind"),
        Index(
            "ix_schedule_fires_buffered",
            "schedule_id",
            postgresql_where=text("status = 'buffered'"),
        ),
        # Fires whose execution has not been seen to finish (pause_after_failures counts them).
        Index(
            "ix_schedule_fires_unsettled",
            "schedule_id",
            postgresql_where=text("status = 'fired' AND outcome IS NULL"),
        ),
        # The statistics tally's watermark on schedule lag (app/stats/tally.py).
        Index("ix_schedule_fires_fired_at", "fired_at"),
    )

    schedule_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("schedules.id", ondelete="CASCADE"), primary_key=True
    )
    fire_time: Mapped[dt.datetime] = mapped_column(primary_key=True)
    # No foreign key: the schedule's cascade removes these rows with their organization, and
    # one check fewer per row counts when 10,000 fire in the same second.
    org_id: Mapped[uuid.UUID]
    fired_at: Mapped[dt.datetime] = now_column()
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    skipped_reason: Mapped[str | None] = mapped_column(Text)
    execution_id: Mapped[uuid.UUID | None]
    chain_execution_id: Mapped[uuid.UUID | None]
    # The execution's terminal status once beat has seen it (only while someone counts).
    outcome: Mapped[str | None] = mapped_column(String(16))
    fired_by: Mapped[str | None] = mapped_column(Text)
