from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Computed,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TSVECTOR
from sqlalchemy.orm import Mapped, mapped_column

from app.audit.models import CreatedBy
from app.db import Base, now_column, uuid_pk

# The `q` filter searches words of the name and description; pg_trgm is not in every PostgreSQL
# build (the embedded one lacks it), full-text search is. A stored generated column keeps the
# index on a plain column, which Alembic can compare with the models.
SEARCH_VECTOR = "to_tsvector('simple', name || ' ' || coalesce(description, ''))"
VISIBILITIES = ("private", "public")


class Agent(Base):
    __tablename__ = "agents"
    __table_args__ = (
        UniqueConstraint("org_id", "name", name="uq_agents_org_id_name"),
        Index("ix_agents_org_id_created_at", "org_id", "created_at"),
        Index("ix_agents_tags", "tags", postgresql_using="gin"),
        Index("ix_agents_capabilities", "capabilities", postgresql_using="gin"),
        Index("ix_agents_search", "search", postgresql_using="gin"),
        CheckConstraint(f"visibility IN {VISIBILITIES!r}", name="visibility"),
        # GET /catalog: the public, live agents of every organization, newest first.
        Index(
            "ix_agents_catalog",
            text("created_at DESC"),
            "id",
            postgresql_where=text("visibility = 'public' AND archived_at IS NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default="{}")
    # Copied from the current version so the capability filter can use an index.
    capabilities: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default="{}")
    current_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("agent_versions.id", use_alter=True, ondelete="SET NULL")
    )
    current_version: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = now_column()
    updated_at: Mapped[dt.datetime] = now_column()
    archived_at: Mapped[dt.datetime | None]
    # `public`: listed in the catalog and runnable by every organization (app/catalog).
    visibility: Mapped[str] = mapped_column(String(16), server_default="private")
    # Executions other organizations started through the catalog (counted as they are stored).
    catalog_runs: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    search: Mapped[str] = mapped_column(
        TSVECTOR, Computed(SEARCH_VECTOR, persisted=True), deferred=True
    )


class AgentVersion(CreatedBy, Base):
    """An immutable definition. Rows are inserted, never updated."""

    __tablename__ = "agent_versions"
    __table_args__ = (
        UniqueConstraint("agent_id", "version", name="uq_agent_versions_agent_id_version"),
        Index("ix_agent_versions_agent_id_semver", "agent_id", "major", "minor", "patch"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"))
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    version: Mapped[str] = mapped_column(String(32))
    major: Mapped[int] = mapped_column(Integer)
    minor: Mapped[int] = mapped_column(Integer)
    patch: Mapped[int] = mapped_column(Integer)
    runtime: Mapped[dict[str, Any]]
    input_schema: Mapped[dict[str, Any]]
    output_schema: Mapped[dict[str, Any]]
    timeout_seconds: Mapped[int] = mapped_column(Integer)
    retry: Mapped[dict[str, Any]]
    limits: Mapped[dict[str, Any]]
    queue: Mapped[str] = mapped_column(String(63))
    # As the definition gave them: names, or {"name", "providers"?, "chains"?, "authority"?}.
    capabilities: Mapped[list[Any]] = mapped_column(JSONB)
    config: Mapped[dict[str, Any]]
    # Flow control (versioned like the rest): {"limit", "key"?, "on_limit"} and
    # {"limit", "period_seconds", "key"?}, or None.
    concurrency: Mapped[dict[str, Any] | None]
    rate_limit: Mapped[dict[str, Any] | None]
    # What its transfers may spend (app/agents/wallet_policy.py); None: every transfer refused.
    wallet_policy: Mapped[dict[str, Any] | None]
    # What the version changed, in its author's words (PATCH `changelog`).
    changelog: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = now_column()
