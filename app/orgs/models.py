from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, now_column, uuid_pk

ROLES = ("admin", "developer", "operator", "viewer")


# Limits an organization's work is admitted under (app/flow); unset (NULL) means none.
LIMITS = (
    "max_running",
    "max_queued",
    "submit_rate",
    "submit_burst",
    "cpu_seconds_per_day",
    "retention_days",
)


class Organization(Base):
    __tablename__ = "organizations"
    __table_args__ = (
        *(CheckConstraint(f"{name} IS NULL OR {name} > 0", name=name) for name in LIMITS),
        CheckConstraint("weight BETWEEN 1 AND 1000", name="weight"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    name: Mapped[str] = mapped_column(String(63), unique=True)
    created_at: Mapped[dt.datetime] = now_column()
    max_running: Mapped[int | None]
    max_queued: Mapped[int | None]
    submit_rate: Mapped[float | None]
    submit_burst: Mapped[int | None]
    cpu_seconds_per_day: Mapped[float | None]
    # Days its finished executions are kept (None: RUNYARD_RETENTION_DAYS).
    retention_days: Mapped[int | None]
    weight: Mapped[int] = mapped_column(server_default=text("1"))


class ApiToken(Base):
    """A bearer token. Only its SHA-256 is stored; the token itself is shown once."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        CheckConstraint(f"role IN {ROLES!r}", name="role"),
        Index("ix_api_tokens_org_id", "org_id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = now_column()
    expires_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]
    # Set when a request used it, at most once a minute per API process (app/orgs/services.py).
    last_used_at: Mapped[dt.datetime | None]
