from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, now_column, uuid_pk


class UiSession(Base):
    """A console sign-in. The cookie holds a random id; only its SHA-256 is stored, next to the
    token it was opened with (checked on every request, so revoking the token ends it)."""

    __tablename__ = "ui_sessions"
    __table_args__ = (
        Index("ix_ui_sessions_token_id", "token_id"),
        Index("ix_ui_sessions_expires_at", "expires_at"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    token_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_tokens.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = now_column()
    expires_at: Mapped[dt.datetime]
