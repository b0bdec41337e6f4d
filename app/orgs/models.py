from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, now_column, uuid_pk

ROLES = ("admin", "developer", "operator", "viewer")


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[uuid.UUID] = uuid_pk()
    name: Mapped[str] = mapped_column(String(63), unique=True)
    created_at: Mapped[dt.datetime] = now_column()


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
