"""The audit trail's tables, and the `created_by` columns of what tokens make."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Identity, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base

GENESIS = "0" * 64


class AuditHead(Base):
    """The head of an organization's chain (made by a trigger on organizations): the last
    sealed seq and its hash, where the sealer takes up the chain."""

    __tablename__ = "audit_heads"

    org_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    hash: Mapped[str] = mapped_column(String(64), server_default=GENESIS)
    prev_hash: Mapped[str] = mapped_column(String(64), server_default=GENESIS)


class AuditEvent(Base):
    """One audited change. Written unsealed (seq, body and hash NULL; the body drafted in two
    pieces around the prev_hash and seq it lacks), then sealed: numbered, its body completed
    and hashed. `body` is the canonical JSON that was hashed; the other columns repeat parts of
    it for the filters (verify checks they agree)."""

    __tablename__ = "audit_events"
    __table_args__ = (
        UniqueConstraint("org_id", "seq", name="uq_audit_events_org_id_seq"),
        Index(
            "ix_audit_events_unsealed",
            "org_id",
            "id",
            postgresql_where=text("seq IS NULL"),
        ),
        Index("ix_audit_events_org_id_action", "org_id", "action", "seq"),
        Index("ix_audit_events_org_id_object", "org_id", "object_type", "object_id", "seq"),
        Index("ix_audit_events_org_id_at", "org_id", "at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    seq: Mapped[int | None] = mapped_column(BigInteger)
    at: Mapped[dt.datetime]
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    draft_head: Mapped[str | None] = mapped_column(Text)
    draft_mid: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str | None] = mapped_column(Text)
    hash: Mapped[str | None] = mapped_column(String(64))


class CreatedBy:
    """The token that made the row: None for what the system makes (schedule fires, webhook
    runs, chain steps) and for rows older than the audit trail."""

    created_by_token_id: Mapped[uuid.UUID | None] = mapped_column(nullable=True)
    created_by_token_name: Mapped[str | None] = mapped_column(Text, nullable=True)

    @property
    def created_by(self) -> dict[str, Any] | None:
        if self.created_by_token_id is None:
            return None
        return {"token_id": self.created_by_token_id, "token_name": self.created_by_token_name}
