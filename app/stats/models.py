"""Tables of the statistics tally (app/stats/tally.py): rollups per agent, minute and hour for
GET /agents/{ref}/stats, and cumulative totals for /metrics. The tally alone writes them; they
outlive the executions they count (retention deletes those, the totals stay monotonic)."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, Integer, SmallInteger, String
from sqlalchemy import text as sql
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base

ZERO_UUID = "00000000-0000-0000-0000-000000000000"


def _org(primary_key: bool = False) -> Mapped[uuid.UUID]:
    """The organization whose executions a row counts: part of the key where an agent's rows
    may be several organizations' (a public agent's runs through the catalog)."""
    return mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=primary_key
    )


def _agent() -> Mapped[uuid.UUID]:
    return mapped_column(ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True)


def _hist() -> Mapped[list[int]]:
    return mapped_column(ARRAY(BigInteger))


class StatsWatermark(Base):
    """How far the tally has counted an organization's executions: finished ones by
    (finished_at, id), submitted ones by (queued_at, id)."""

    __tablename__ = "stats_watermarks"

    org_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    finished_at: Mapped[dt.datetime] = mapped_column(server_default=sql("'epoch'"))
    finished_id: Mapped[uuid.UUID] = mapped_column(server_default=sql(f"'{ZERO_UUID}'"))
    queued_at: Mapped[dt.datetime] = mapped_column(server_default=sql("'epoch'"))
    queued_id: Mapped[uuid.UUID] = mapped_column(server_default=sql(f"'{ZERO_UUID}'"))


class AgentStatsRollup(Base):
    """Executions of one agent that finished in one UTC minute (span 60), hour (3600) or day
    (86400): their counts by status, histograms of duration and queue wait over all of them
    (app/stats/buckets.py), and the latest failure among them. Statuses share one row, and
    whole days one row, so that a 7-day window sums about a hundred rows at most."""

    __tablename__ = "agent_stats_rollups"
    __table_args__ = (Index("ix_agent_stats_rollups_bucket_start", "bucket_start"),)

    agent_id: Mapped[uuid.UUID] = _agent()
    span_seconds: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket_start: Mapped[dt.datetime] = mapped_column(primary_key=True)
    org_id: Mapped[uuid.UUID] = _org(primary_key=True)
    succeeded: Mapped[int] = mapped_column(BigInteger)
    failed: Mapped[int] = mapped_column(BigInteger)
    timed_out: Mapped[int] = mapped_column(BigInteger)
    cancelled: Mapped[int] = mapped_column(BigInteger)
    durations: Mapped[list[int]] = _hist()
    queue_waits: Mapped[list[int]] = _hist()
    last_failure_id: Mapped[uuid.UUID | None]
    last_failure_at: Mapped[dt.datetime | None]


class ExecutionTotal(Base):
    """Every execution of an agent on a queue that ended with a status, since the tally began."""

    __tablename__ = "execution_totals"

    agent_id: Mapped[uuid.UUID] = _agent()
    queue: Mapped[str] = mapped_column(String(63), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    org_id: Mapped[uuid.UUID] = _org(primary_key=True)
    executions: Mapped[int] = mapped_column(BigInteger)
    durations: Mapped[list[int]] = _hist()
    duration_ms_sum: Mapped[float]
    queue_waits: Mapped[list[int]] = _hist()
    queue_wait_ms_sum: Mapped[float]


class SubmissionTotal(Base):
    __tablename__ = "submission_totals"

    agent_id: Mapped[uuid.UUID] = _agent()
    org_id: Mapped[uuid.UUID] = _org(primary_key=True)
    submitted: Mapped[int] = mapped_column(BigInteger)


class ScheduleLagTotal(Base):
    """One row: the histogram of schedule lag (fired_at - fire_time) and its watermark."""

    __tablename__ = "schedule_lag_totals"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    fired_at: Mapped[dt.datetime]
    schedule_id: Mapped[uuid.UUID]
    fire_time: Mapped[dt.datetime]
    lags: Mapped[list[int]] = _hist()
    lag_ms_sum: Mapped[float]
