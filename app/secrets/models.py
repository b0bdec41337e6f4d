from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, now_column, uuid_pk


class Secret(Base):
    """A value of an organization, sealed (app/secrets/crypto.py) with the organization's id and
    the name as associated data. Never shown: only the worker opens it, at run time."""

    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_secrets_org_id_name"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    sealed_value: Mapped[str] = mapped_column(Text)
    # 1 at the first PUT, one more at each PUT after.
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = now_column()
    updated_at: Mapped[dt.datetime] = now_column()
