"""Alembic environment. The database schema comes from these migrations only."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from app.config import Config
from app.models import metadata

config = context.config

# A migration that waits on a lock would stall every request queued behind it: fail fast instead
# and let the operator retry at a quiet moment.
LOCK_TIMEOUT = "5s"
STATEMENT_TIMEOUT = "120s"


def database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or Config.from_env().require_database()


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run(connection)


def _run(connection) -> None:
    connection.exec_driver_sql(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
    connection.exec_driver_sql(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
    # SQLAlchemy began a transaction for the SETs; end it so Alembic owns (and commits) its own.
    connection.commit()
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
