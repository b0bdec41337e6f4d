"""documents: files an organization uploads, and the executions they were handed to

Revision ID: 0021_documents
Revises: 0020_agent_state
Create Date: 2026-12-14 10:00:00.000000

A document's bytes are in `content` (bytea) unless RUNYARD_DOCUMENTS_PATH was set when it was
uploaded: then `content` is NULL and the bytes are the file named by its id in that directory.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0021_documents"
down_revision = "0020_agent_state"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "documents",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("content_type", sa.String(length=255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("content", postgresql.BYTEA(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("created_by_token_id", sa.Uuid(), nullable=True),
        sa.Column("created_by_token_name", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_documents_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_documents")),
    )
    # GET /documents: the organization's, newest first.
    op.create_index("ix_documents_org_id_created_at", "documents", ["org_id", "created_at"])
    op.create_table(
        "execution_documents",
        sa.Column("execution_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.SmallInteger(), nullable=False),
        sa.Column("document_id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
            name=op.f("fk_execution_documents_execution_id_executions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["documents.id"],
            name=op.f("fk_execution_documents_document_id_documents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_execution_documents_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("execution_id", "position", name=op.f("pk_execution_documents")),
    )
    # A delete's look for unfinished executions using the document, and the cascade.
    op.create_index("ix_execution_documents_document_id", "execution_documents", ["document_id"])


def downgrade() -> None:
    op.drop_index("ix_execution_documents_document_id", table_name="execution_documents")
    op.drop_table("execution_documents")
    op.drop_index("ix_documents_org_id_created_at", table_name="documents")
    op.drop_table("documents")
