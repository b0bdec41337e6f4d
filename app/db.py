"""Engine, sessions and the typed declarative base.

Two ways in:
- ``session()``: an ORM Session for everything that is not the hot path.
- ``hot()``: a connection in autocommit for the one-statement steps of submit, claim and finish,
  where a BEGIN/COMMIT round trip per statement would cost a measurable share of throughput.

Tests bind both to one connection inside an outer transaction (``bind_for_tests``), so every test
rolls back while the code under test still commits.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, DateTime, Engine, MetaData, create_engine, func, select
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dict[str, Any]: JSONB,
        uuid.UUID: UUID(as_uuid=True),
        dt.datetime: DateTime(timezone=True),
    }


def uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(primary_key=True, default=uuid.uuid4)


def now_column() -> Mapped[dt.datetime]:
    return mapped_column(server_default=func.now())


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def page(session: Session, query: Any, *order_by: Any, offset: int, limit: int) -> tuple[list, int]:
    """One page of a list query, in the given order, and the total it was cut from."""
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    if offset >= total:  # also a page number past PostgreSQL's bigint OFFSET: no rows, no query
        return [], total
    items = session.scalars(query.order_by(*order_by).offset(offset).limit(limit)).all()
    return list(items), total


class Database:
    """One engine per process; created lazily so forked pool processes build their own."""

    def __init__(self) -> None:
        self._url: str | None = None
        self._engine: Engine | None = None
        self._autocommit: Engine | None = None
        self._sessionmaker: sessionmaker[Session] | None = None
        self._test_connection: Connection | None = None
        self._lock = threading.Lock()

    def configure(self, url: str) -> None:
        if url != self._url:
            self.dispose()
            self._url = url

    @property
    def bound_for_tests(self) -> bool:
        return self._test_connection is not None

    @property
    def configured(self) -> bool:
        return self._url is not None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    if not self._url:
                        raise RuntimeError("database not configured: call db.configure(url)")
                    # No pre-ping: it costs a round trip per checkout on the hot path. A
                    # connection found dead raises once and SQLAlchemy then replaces the pool.
                    options = {
                        "pool_size": 5,
                        "max_overflow": 10,
                        # A dead or stalled database must answer 503 within seconds, never
                        # hang a request: bounded waits for a pooled connection, for connecting,
                        # for a statement, and for a peer that stopped answering (keepalives,
                        # tcp_user_timeout). Timestamps leave the database in UTC.
                        "pool_timeout": 5,
                        "connect_args": {
                            "connect_timeout": 5,
                            "options": "-c timezone=UTC -c statement_timeout=8000",
                            "keepalives": 1,
                            "keepalives_idle": 5,
                            "keepalives_interval": 2,
                            "keepalives_count": 2,
                            "tcp_user_timeout": 8000,
                        },
                    }
                    self._engine = create_engine(self._url, **options)
                    # A pool of its own, set to autocommit once per connection rather than
                    # switched on every checkout.
                    self._autocommit = create_engine(
                        self._url, isolation_level="AUTOCOMMIT", **options
                    )
                    self._sessionmaker = sessionmaker(self._engine, expire_on_commit=False)
        return self._engine

    def session(self) -> Session:
        if self._test_connection is not None:
            return Session(
                bind=self._test_connection,
                join_transaction_mode="create_savepoint",
                expire_on_commit=False,
            )
        self.engine  # noqa: B018 - builds the sessionmaker
        assert self._sessionmaker is not None
        return self._sessionmaker()

    @contextmanager
    def hot(self) -> Iterator[Connection]:
        """An autocommit connection: each statement is its own transaction."""
        if self._test_connection is not None:
            yield self._test_connection
            return
        self.engine  # noqa: B018
        assert self._autocommit is not None
        with self._autocommit.connect() as conn:
            yield conn

    @contextmanager
    def bind_for_tests(self, connection: Connection) -> Iterator[None]:
        self._test_connection = connection
        try:
            yield
        finally:
            self._test_connection = None

    def dispose(self) -> None:
        for engine in (self._engine, self._autocommit):
            if engine is not None:
                engine.dispose(close=False)
        self._engine = None
        self._autocommit = None
        self._sessionmaker = None


db = Database()

__all__ = ["JSONB", "UUID", "Base", "Database", "db", "now_column", "utcnow", "uuid_pk"]
