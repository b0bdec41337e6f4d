from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    ARRAY,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    Uuid,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, aggregate_order_by
from sqlalchemy.orm import Mapped, column_property, mapped_column

from app.audit.models import CreatedBy
from app.db import Base
from app.executions.spec import JOURNAL_KINDS, STATUSES, WAITING_FOR


class Execution(CreatedBy, Base):
    __tablename__ = "executions"
    __table_args__ = (
        CheckConstraint(f"status IN {STATUSES!r}", name="status"),
        CheckConstraint("priority BETWEEN 0 AND 9", name="priority"),
        CheckConstraint(
            f"waiting_for IS NULL OR waiting_for IN {WAITING_FOR!r}", name="waiting_for"
        ),
        Index("ix_executions_org_id_queued_at", "org_id", text("queued_at DESC")),
        Index(
            "ix_executions_org_id_agent_id_queued_at", "org_id", "agent_id", text("queued_at DESC")
        ),
        Index("ix_executions_org_id_status_queued_at", "org_id", "status", text("queued_at DESC")),
        # The CPU an organization's executions used today (app/flow: cpu_seconds_per_day).
        Index(
            "ix_executions_org_id_finished_at",
            "org_id",
            "finished_at",
            postgresql_where=text("finished_at IS NOT NULL"),
        ),
        # The sweeper's two questions: what was committed but never published, whose lease ran out.
        Index(
            "ix_executions_undispatched",
            "queued_at",
            postgresql_where=text(
                "status = 'queued' AND dispatched_at IS NULL AND waiting_for IS NULL"
            ),
        ),
        # Queued rows by age: the scans for messages the broker lost (app/executions/recovery.py).
        Index(
            "ix_executions_queued",
            "queued_at",
            "id",
            postgresql_where=text("status = 'queued'"),
        ),
        Index(
            "ix_executions_running_lease",
            "lease_until",
            postgresql_where=text("status = 'running'"),
        ),
        # Flow control (app/executions/gates.py): an organization's unclaimed messages per queue
        # (the fair window), the executions held back in the order they are let through, the
        # slots of a concurrency group, the starts of a rate-limit group, and the active
        # executions that count against max_running.
        Index(
            "ix_executions_org_id_queue_unclaimed",
            "org_id",
            "queue",
            postgresql_where=text("status = 'queued' AND waiting_for IS NULL"),
        ),
        Index(
            "ix_executions_org_id_queue_waiting",
            "org_id",
            "queue",
            text("priority DESC"),
            "queued_at",
            postgresql_where=text("status = 'queued' AND waiting_for = 'queue'"),
        ),
        Index(
            "ix_executions_org_id_limit_waiting",
            "org_id",
            text("priority DESC"),
            "queued_at",
            postgresql_where=text("status = 'queued' AND waiting_for <> 'queue'"),
        ),
        Index(
            "ix_executions_agent_id_flow_key_active",
            "agent_id",
            "flow_key",
            postgresql_where=text("flow_key IS NOT NULL AND status IN ('queued', 'running')"),
        ),
        Index(
            "ix_executions_agent_id_rate_key_started_at",
            "agent_id",
            "rate_key",
            "started_at",
            postgresql_where=text("rate_key IS NOT NULL"),
        ),
        Index(
            "ix_executions_org_id_gated_active",
            "org_id",
            postgresql_where=text(
                "gated AND status IN ('queued', 'running') AND waiting_for IS NULL"
            ),
        ),
        Index(
            "ix_executions_chain_execution_id_chain_stage",
            "chain_execution_id",
            "chain_stage",
            postgresql_where=text("chain_execution_id IS NOT NULL"),
        ),
        # Deleting an execution sets the rerun_of of its reruns NULL: found through this index.
        Index("ix_executions_rerun_of", "rerun_of", postgresql_where=text("rerun_of IS NOT NULL")),
        # Durable agents (app/executions/waiting.py): an execution's children, and the waits
        # beat wakes when their time comes.
        Index(
            "ix_executions_parent_execution_id",
            "parent_execution_id",
            postgresql_where=text("parent_execution_id IS NOT NULL"),
        ),
        Index(
            "ix_executions_waiting_wake_at", "wake_at", postgresql_where=text("status = 'waiting'")
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"))
    version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agent_versions.id"))
    agent_name: Mapped[str] = mapped_column(String(63))
    agent_version: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(SmallInteger, server_default="5")
    input: Mapped[dict[str, Any]]
    output: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    attempt: Mapped[int] = mapped_column(Integer, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, server_default="1")
    worker: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[dt.datetime | None]
    queued_at: Mapped[dt.datetime] = mapped_column(server_default=text("now()"))
    dispatched_at: Mapped[dt.datetime | None]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    cancel_requested_at: Mapped[dt.datetime | None]
    resource_usage: Mapped[dict[str, Any] | None]
    # Chain steps (app/chains): the chain execution, the step's index in the chain version's
    # flattened steps, the stage that orders it (compensations come after the chain's stages),
    # and whether it is the step itself or its compensation.
    chain_execution_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("chain_executions.id", ondelete="CASCADE")
    )
    chain_step: Mapped[int | None] = mapped_column(SmallInteger)
    chain_stage: Mapped[int | None] = mapped_column(SmallInteger)
    chain_role: Mapped[str | None] = mapped_column(String(16))
    # Flow control (app/executions/gates.py): the broker queue; why a queued execution is held
    # back with no message in the broker (None: it is not); the values of its concurrency and
    # rate-limit keys (None: the agent has no such limit); whether any limit applied when it was
    # submitted, in which case its end frees a slot.
    queue: Mapped[str | None] = mapped_column(String(63))
    waiting_for: Mapped[str | None] = mapped_column(String(24))
    flow_key: Mapped[str | None] = mapped_column(Text)
    rate_key: Mapped[str | None] = mapped_column(Text)
    gated: Mapped[bool] = mapped_column(server_default=text("false"))
    # The execution this one reruns (POST /executions/{id}/rerun, the bulk rerun). On a chain
    # step it marks a reused step: a copy of the original step's outcome, run by no worker.
    rerun_of: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("executions.id", ondelete="SET NULL")
    )
    # Live events (app/executions/events.py): the agent's last ctx.progress ({"fraction",
    # "message", "at"}), the W3C traceparent it was submitted with, and until when an open
    # event stream watches it (the worker's writes notify only while this is in the future).
    progress: Mapped[dict[str, Any] | None]
    traceparent: Mapped[str | None] = mapped_column(String(55))
    watched_until: Mapped[dt.datetime | None]
    # Durable agents: the execution that started this one through ctx.run / ctx.start and how
    # deep it is (a root is 0); `resuming` marks a waiting execution queued again (its claim
    # keeps the attempt: a resume is not a retry); while `waiting`, when beat wakes it (a
    # sleep's due time, an event wait's timeout) and the children it waits for.
    parent_execution_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("executions.id", ondelete="SET NULL")
    )
    depth: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    resuming: Mapped[bool] = mapped_column(server_default=text("false"))
    # Counts the wakes: with the attempt (which a resume keeps), it tells one run of the
    # attempt from the next, and fences a stale retry of a suspend (app/executions/waiting.py).
    resumes: Mapped[int] = mapped_column(Integer, server_default="0")
    wake_at: Mapped[dt.datetime | None]
    awaiting: Mapped[list[uuid.UUID] | None] = mapped_column(ARRAY(Uuid))
    # How POST /api/v1/executions chose the agent: {"capability", "candidates"} (None when the
    # submit named the agent).
    assigned_by: Mapped[dict[str, Any] | None]


# The ids of an execution's children, oldest first: one probe of
# ix_executions_parent_execution_id per execution read through the ORM (the API's reads; the
# hot paths write with SQL of their own).
_child = Execution.__table__.alias("child")
Execution.children = column_property(
    select(
        func.coalesce(
            func.array_agg(aggregate_order_by(_child.c.id, _child.c.queued_at)),
            text("'{}'::uuid[]"),
        )
    )
    .where(_child.c.parent_execution_id == Execution.id)
    .correlate_except(_child)
    .scalar_subquery()
)


class ExecutionAttempt(Base):
    """One finished attempt of an execution: its own outcome, error and worker.

    Written in the same statement that ends the attempt (finish, retry, or the sweeper taking a
    lost one back); the attempt still running is read from the execution row itself."""

    __tablename__ = "execution_attempts"
    __table_args__ = (CheckConstraint(f"status IN {STATUSES!r}", name="status"),)

    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("executions.id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[dict[str, Any] | None]
    worker: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime]
    resource_usage: Mapped[dict[str, Any] | None]


class ExecutionLog(Base):
    """A log line. No foreign key to its execution: a trigger on executions deletes the lines
    of deleted executions (migration 0012_logs), and the insert's join checks it exists."""

    __tablename__ = "execution_logs"
    # GET /logs: one organization's lines, newest first.
    __table_args__ = (Index("ix_execution_logs_org_id_ts", "org_id", text("ts DESC")),)

    execution_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The execution's organization, copied when the line is written (no foreign key: its check
    # would cost every line; the lines go with their execution).
    org_id: Mapped[uuid.UUID]
    attempt: Mapped[int] = mapped_column(Integer)
    ts: Mapped[dt.datetime]
    level: Mapped[int] = mapped_column(SmallInteger)
    message: Mapped[str] = mapped_column(Text)
    fields: Mapped[dict[str, Any] | None]


class JournalEntry(Base):
    """One durable call of an execution (ctx.step, ctx.start / ctx.run, ctx.sleep,
    ctx.wait_for_event), in call order: a replay answers each call from here (app/durable).

    `status`: a step is `done`; a child, `pending` until it ends, then its terminal status (the
    trigger of migration 0019 writes it, with `result` {output, error}); a sleep, `pending` then
    `done`; an event wait, `pending`, then `received` (`result`: the event's data) or
    `timed_out`."""

    __tablename__ = "execution_journal"
    __table_args__ = (
        CheckConstraint(f"kind IN {JOURNAL_KINDS!r}", name="kind"),
        Index(
            "ix_execution_journal_child_execution_id",
            "child_execution_id",
            unique=True,
            postgresql_where=text("child_execution_id IS NOT NULL"),
        ),
        Index(
            "ix_execution_journal_pending_events",
            "org_id",
            "name",
            postgresql_where=text("kind = 'event' AND status = 'pending'"),
        ),
    )

    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("executions.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[uuid.UUID]
    kind: Mapped[str] = mapped_column(String(8))
    name: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    result: Mapped[Any | None] = mapped_column(JSONB)
    at: Mapped[dt.datetime] = mapped_column(server_default=text("now()"))
    child_execution_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("executions.id", ondelete="SET NULL")
    )
    # A sleep's due time, an event wait's timeout; an event wait's match ([{"path", "value"}]).
    due_at: Mapped[dt.datetime | None]
    match: Mapped[Any | None] = mapped_column(JSONB)


class ExecutionToken(Base):
    """The token a `command` or `http` agent calls the API with (RUNYARD_EXECUTION_TOKEN),
    stored hashed, one per execution: issued for an attempt, it answers only while that
    attempt runs (app/orgs/services.py), so it expires with the run."""

    __tablename__ = "execution_tokens"

    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("executions.id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
