"""Agents' wallets and the decisions their transfers make.

A decision is the record of one transfer an agent asked for: what it asked, how the policy
judged it, and what became of it. Decisions outlive the executions that made them (retention
deletes executions, never decisions: `execution_id` is set to NULL) and the agents they belong
to (`agent_name` stays).
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, Numeric, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.audit.models import CreatedBy
from app.db import Base, now_column, uuid_pk

DECISION_STATUSES = (
    "refused",
    "awaiting_approval",
    "rejected",
    "queued",
    "sent",
    "mined",
    "errored",
)
# What counts against `max_per_day`: everything allowed or still to be answered.
SPENDING_STATUSES = ("awaiting_approval", "queued", "sent", "mined")


class AgentWallet(CreatedBy, Base):
    """An agent's one wallet, made by the wallet service (`provider`)."""

    __tablename__ = "agent_wallets"
    __table_args__ = (Index("ix_agent_wallets_org_id", "org_id"),)

    agent_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True
    )
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(128))
    label: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str] = mapped_column(String(32), server_default="engine")
    created_at: Mapped[dt.datetime] = now_column()


class Decision(Base):
    __tablename__ = "decisions"
    __table_args__ = (
        # A replayed attempt asks again with the same key and finds the decision it made.
        UniqueConstraint("execution_id", "step_key", name="uq_decisions_execution_id_step_key"),
        CheckConstraint(f"status IN {DECISION_STATUSES!r}", name="status"),
        CheckConstraint("kind = 'transfer'", name="kind"),
        Index("ix_decisions_org_id_created_at", "org_id", "created_at"),
        # The day's spending of one agent, counted under its lock.
        Index("ix_decisions_agent_id_created_at", "agent_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    agent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id", ondelete="SET NULL"))
    agent_name: Mapped[str] = mapped_column(String(63))
    execution_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("executions.id", ondelete="SET NULL")
    )
    step_key: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16), server_default="transfer")
    chain: Mapped[str] = mapped_column(Text)
    to: Mapped[str] = mapped_column("to_address", Text)
    amount: Mapped[Decimal] = mapped_column(Numeric(38, 18))
    currency: Mapped[str] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    policy_check: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(24))
    queue_id: Mapped[str | None] = mapped_column(Text)
    # The first send's start (app/wallets/transfers.py: not sent again past the service's 24 h).
    send_started_at: Mapped[dt.datetime | None]
    transaction_hash: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    # The admin token that answered a decision awaiting approval: {"token_id", "token_name"}.
    approved_by: Mapped[dict[str, Any] | None]
    created_at: Mapped[dt.datetime] = now_column()
    updated_at: Mapped[dt.datetime] = now_column()
