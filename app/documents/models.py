from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import BigInteger, ForeignKey, Index, SmallInteger, String
from sqlalchemy.dialects.postgresql import BYTEA
from sqlalchemy.orm import Mapped, mapped_column

from app.audit.models import CreatedBy
from app.db import Base, now_column, uuid_pk


class Document(CreatedBy, Base):
    """A file of an organization, handed to the executions that name it (ctx.documents).

    Its bytes are in `content`, or, when RUNYARD_DOCUMENTS_PATH was set at upload, in the file
    named by its id in that directory (`content` NULL). Deferred: reading a document's row
    never loads its bytes unless asked."""

    __tablename__ = "documents"
    __table_args__ = (Index("ix_documents_org_id_created_at", "org_id", "created_at"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content: Mapped[bytes | None] = mapped_column(BYTEA, deferred=True)
    created_at: Mapped[dt.datetime] = now_column()


class ExecutionDocument(Base):
    """A document an execution was submitted with, at its place in the submit's list. Written
    in the transaction that inserts the execution; gone with the execution (retention) or the
    document (a delete, allowed once no unfinished execution uses it)."""

    __tablename__ = "execution_documents"
    __table_args__ = (Index("ix_execution_documents_document_id", "document_id"),)

    execution_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("executions.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    document_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
