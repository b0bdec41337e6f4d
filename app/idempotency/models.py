from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, now_column


class IdempotencyKey(Base):
    """The first answer to a POST sent with an `Idempotency-Key`, replayed to its repeats.

    Written in the same transaction as whatever the request created, so a row exists only for a
    request that was carried out; `response_status` is null only inside that transaction."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)

    org_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    # sha256 (hex) of the method, the path and the canonical JSON body.
    request_hash: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None]
    created_at: Mapped[dt.datetime] = now_column()
