from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, now_column


class AgentState(Base):
    """One key of an agent's state, as an organization keeps it: JSON that the agent's runs
    (`ctx.state`) and the API read and write, with a version that grows by one per write.

    Keyed by the organization as well as the agent: a public agent run through the catalog
    keeps the caller's state apart from its owner's (and from every other caller's)."""

    __tablename__ = "agent_state"
    __table_args__ = (
        CheckConstraint("version >= 1", name="version"),
        # An agent's rows, for the cascade when it is deleted.
        Index("ix_agent_state_agent_id", "agent_id"),
    )

    org_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    agent_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[dict[str, Any]]
    # 1 at the first write, one more at each write after (a delete starts it again).
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = now_column()
