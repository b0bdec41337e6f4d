from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.audit.models import CreatedBy
from app.db import JSONB, Base, now_column, uuid_pk

# queued -> running -> succeeded | failed | cancelled; a `stop` failure passes through
# `compensating` while the compensate agents run.
CHAIN_STATUSES = ("queued", "running", "compensating", "succeeded", "failed", "cancelled")
ACTIVE_CHAIN_STATUSES = ("queued", "running", "compensating")


class Chain(Base):
    __tablename__ = "chains"
    __table_args__ = (
        UniqueConstraint("org_id", "name", name="uq_chains_org_id_name"),
        Index("ix_chains_org_id_created_at", "org_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str | None] = mapped_column(Text)
    current_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("chain_versions.id", use_alter=True, ondelete="SET NULL")
    )
    current_version: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = now_column()
    updated_at: Mapped[dt.datetime] = now_column()
    archived_at: Mapped[dt.datetime | None]


class ChainVersion(CreatedBy, Base):
    """An immutable chain definition (input_schema, steps, on_failure). Inserted, never updated."""

    __tablename__ = "chain_versions"
    __table_args__ = (
        UniqueConstraint("chain_id", "version", name="uq_chain_versions_chain_id_version"),
        Index("ix_chain_versions_chain_id_semver", "chain_id", "major", "minor", "patch"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    chain_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("chains.id", ondelete="CASCADE"))
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    version: Mapped[str] = mapped_column(String(32))
    major: Mapped[int] = mapped_column(Integer)
    minor: Mapped[int] = mapped_column(Integer)
    patch: Mapped[int] = mapped_column(Integer)
    input_schema: Mapped[dict[str, Any]]
    steps: Mapped[list[Any]] = mapped_column(JSONB)
    on_failure: Mapped[str] = mapped_column(String(16))
    # What the version changed, in its author's words (PATCH `changelog`).
    changelog: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = now_column()


class ChainExecution(CreatedBy, Base):
    __tablename__ = "chain_executions"
    __table_args__ = (
        CheckConstraint(f"status IN {CHAIN_STATUSES!r}", name="status"),
        CheckConstraint("priority BETWEEN 0 AND 9", name="priority"),
        Index("ix_chain_executions_org_id_queued_at", "org_id", text("queued_at DESC")),
        # Chain runs not started yet count against max_queued (app/flow/quotas.py).
        Index(
            "ix_chain_executions_org_id_not_started",
            "org_id",
            postgresql_where=text("status = 'queued'"),
        ),
        # The resumption check's question: which chains are still under way.
        Index(
            "ix_chain_executions_active",
            "queued_at",
            postgresql_where=text("status IN ('queued', 'running', 'compensating')"),
        ),
        Index(
            "ix_chain_executions_rerun_of",
            "rerun_of",
            postgresql_where=text("rerun_of IS NOT NULL"),
        ),
        # Retention: finished chain executions by finish time.
        Index(
            "ix_chain_executions_org_id_finished_at",
            "org_id",
            "finished_at",
            postgresql_where=text("finished_at IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    chain_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("chains.id", ondelete="CASCADE"))
    chain_version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("chain_versions.id"))
    chain_name: Mapped[str] = mapped_column(String(63))
    chain_version: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(SmallInteger, server_default="5")
    input: Mapped[dict[str, Any]]
    output: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    # The agent version each step (and each step's compensate agent) runs, fixed at submit so
    # every step of one chain execution runs the versions it was checked against.
    step_versions: Mapped[list[Any]] = mapped_column(JSONB)
    compensate_versions: Mapped[list[Any]] = mapped_column(JSONB)
    # Step indexes to compensate, in the order they run; set when a `stop` failure happens.
    compensation: Mapped[list[Any] | None] = mapped_column(JSONB)
    queued_at: Mapped[dt.datetime] = now_column()
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    # When the resume check last looked at it: it leaves the chain alone for the grace period.
    resume_checked_at: Mapped[dt.datetime | None]
    # The W3C traceparent of the submit: each step's execution is stored with it.
    traceparent: Mapped[str | None] = mapped_column(String(55))
    # The chain execution this one reruns (POST /chain-executions/{id}/rerun).
    rerun_of: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("chain_executions.id", ondelete="SET NULL")
    )
