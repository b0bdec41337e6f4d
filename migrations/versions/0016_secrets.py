"""secrets; webhook trigger and notification secrets sealed at rest

Revision ID: 0016_secrets
Revises: 0014_console
Create Date: 2026-12-07 10:30:00.000000

Trigger and notification secrets stay in their `secret` column, now as a sealed value
(`ry1.<key id>.<...>`, app/secrets/crypto.py) instead of the clear one. When RUNYARD_SECRET_KEYS
is set where this migration runs, every clear value is sealed here. When it is not, the clear
values are left as they are and still verify deliveries and sign notifications (a clear value
never starts with `ry1.`), until `runyard secrets reencrypt` seals them; every new one is sealed.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from app.secrets.crypto import is_sealed, keyring

revision = "0016_secrets"
down_revision = "0015_audit"
branch_labels = None
depends_on = None

# table -> the prefix of the associated data of its sealed secrets (`<prefix>:<row id>`).
SEALED_TABLES = {"triggers": "trigger", "notifications": "notification"}


def _reseal(forward: bool) -> None:
    conn = op.get_bind()
    ring = keyring()
    for table, kind in SEALED_TABLES.items():
        rows = conn.execute(sa.text(f"SELECT id, secret FROM {table}")).all()
        for row_id, secret in rows:
            if forward == is_sealed(secret):
                continue
            where = f"{kind}:{row_id}"
            value = ring.seal(secret, where) if forward else ring.open(secret, where)
            conn.execute(
                sa.text(f"UPDATE {table} SET secret = :secret WHERE id = :id"),
                {"secret": value, "id": row_id},
            )


def upgrade() -> None:
    op.create_table(
        "secrets",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("sealed_value", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_secrets_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_secrets")),
        sa.UniqueConstraint("org_id", "name", name="uq_secrets_org_id_name"),
    )
    if keyring().keys:
        _reseal(forward=True)


def downgrade() -> None:
    # The code before this revision reads clear values only: open them (a key is needed
    # when some are sealed; KeyMissing says so).
    _reseal(forward=False)
    op.drop_table("secrets")
