"""Engine, sessions and the typed declarative base.

Two ways in:
- ``session()``: an ORM Session for everything that is not the hot path.
- ``hot()``: a connection in autocommit for the one-statement steps of submit, claim and finish,
  where a BEGIN/COMMIT round trip per statement would cost a measurable share of throughput.

Tests bind both to one connection inside an outer transaction (``bind_for_tests``), so every test
rolls back while the code under test still commits.

A request sent with an Idempotency-Key runs in one transaction of its own (``begin_request``):
until it ends, ``session()``, ``hot()`` and ``begin()`` in that context join it with savepoints,
and ``after_commit`` holds back what must not happen before the commit (publishing to the broker).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any

import psycopg
from sqlalchemy import Connection, DateTime, Engine, MetaData, create_engine, func, select
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.engine import Transaction
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

log = logging.getLogger(__name__)

# What a statement raises when the database is unreachable, restarting or failing over (through
# SQLAlchemy, or from the driver connection the hot statements use directly).
DATABASE_ERRORS = (
    OperationalError,
    InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)

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


def driver(conn: Connection) -> psycopg.Connection:
    """The psycopg connection under an SQLAlchemy one. The hot statements (insert, claim,
    finish, a chain step's start) run on it directly: SQLAlchemy's per-statement work was about
    a third of their CPU (measured with cProfile on the worker's run loop)."""
    return conn.connection.driver_connection


def page(session: Session, query: Any, *order_by: Any, offset: int, limit: int) -> tuple[list, int]:
    """One page of a list query, in the given order, and the total it was cut from."""
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    if offset >= total:  # also a page number past PostgreSQL's bigint OFFSET: no rows, no query
        return [], total
    items = session.scalars(query.order_by(*order_by).offset(offset).limit(limit)).all()
    return list(items), total


class RequestTransaction:
    """One transaction on one connection that the code of one request joins (see
    ``Database.begin_request``). Ends once, by ``commit`` or ``rollback``; the connection goes
    back to the pool either way."""

    def __init__(
        self, connection: Connection, transaction: Transaction, owns_connection: bool
    ) -> None:
        self.connection = connection
        self._transaction = transaction
        self._owns_connection = owns_connection
        self._after_commit: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.open = True
        self._token: Token = _request_transaction.set(self)

    def defer(self, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._after_commit.append((callback, args))

    def commit(self) -> None:
        """Commit, then run what waited for the commit. A failed commit raises and runs
        nothing (the pool rolls the connection back)."""
        callbacks = self._after_commit
        try:
            self._transaction.commit()
        finally:
            self._end()
        for callback, args in callbacks:
            try:
                callback(*args)
            except Exception:
                # The work is committed: the sweeper and the chains' resume check publish
                # what could not be published here.
                log.warning("after-commit %s failed", callback.__qualname__, exc_info=True)

    def rollback(self) -> None:
        if not self.open:
            return
        try:
            if self._transaction.is_active:
                self._transaction.rollback()
        finally:
            self._end()

    def _end(self) -> None:
        self.open = False
        self._after_commit = []
        _request_transaction.reset(self._token)
        if self._owns_connection:
            self.connection.close()


_request_transaction: ContextVar[RequestTransaction | None] = ContextVar(
    "runyard_request_transaction", default=None
)


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
                    engine = create_engine(self._url, **options)
                    # A pool of its own, set to autocommit once per connection rather than
                    # switched on every checkout.
                    self._autocommit = create_engine(
                        self._url, isolation_level="AUTOCOMMIT", **options
                    )
                    self._sessionmaker = sessionmaker(engine, expire_on_commit=False)
                    # Set last: a thread that finds it set without taking the lock (the first
                    # requests of a new process, at once) must find the other two set too.
                    self._engine = engine
        return self._engine

    def _joined(self) -> Connection | None:
        """The connection this context's work joins: a request's transaction, else a test's."""
        request = _request_transaction.get()
        return request.connection if request is not None else self._test_connection

    def session(self) -> Session:
        joined = self._joined()
        if joined is not None:
            return Session(
                bind=joined, join_transaction_mode="create_savepoint", expire_on_commit=False
            )
        self.engine  # noqa: B018 - builds the sessionmaker
        assert self._sessionmaker is not None
        return self._sessionmaker()

    @contextmanager
    def hot(self) -> Iterator[Connection]:
        """An autocommit connection: each statement is its own transaction."""
        request = _request_transaction.get()
        if request is not None:
            # A savepoint stands in for autocommit: a failed statement undoes only its own
            # block and leaves the request's transaction usable (for storing a 4xx answer).
            with request.connection.begin_nested():
                yield request.connection
            return
        if self._test_connection is not None:
            yield self._test_connection
            return
        self.engine  # noqa: B018
        autocommit = self._autocommit
        assert autocommit is not None
        with autocommit.connect() as conn:
            try:
                yield conn
            except (psycopg.OperationalError, OperationalError):
                self.drop_if_dead(conn)
                raise

    @contextmanager
    def detached(self) -> Iterator[Connection]:
        """An autocommit connection of its own, outside any request's or test's transaction:
        for bookkeeping (a token's last use) that must neither join nor hold up the work it
        records. It sees committed rows only."""
        self.engine  # noqa: B018
        autocommit = self._autocommit
        assert autocommit is not None
        with autocommit.connect() as conn:
            yield conn

    def drop_if_dead(self, conn: Connection) -> None:
        """After a database error on a `hot()` connection: if the server went away (a restart, a
        failover), drop the connection and the rest of its pool at once, and the ORM's pool too:
        its connections died with the same server. The hot statements run on the driver
        connection directly, so SQLAlchemy never learns of it and would hand out the pools'
        other dead connections one request at a time (each a 503 after the server is back)."""
        if conn.closed:
            return
        # Invalidated: SQLAlchemy saw the disconnect (a statement through it) and dropped this
        # pool, but not the other.
        if conn.invalidated or conn.connection.driver_connection.closed:
            if not conn.invalidated:
                conn.invalidate()
            for engine in (self._autocommit, self._engine):
                if engine is not None:
                    engine.dispose()

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction of its own: committed when the block ends, rolled back if it raises."""
        joined = self._joined()
        if joined is not None:
            with joined.begin_nested():
                yield joined
            return
        with self.engine.begin() as conn:
            yield conn

    def begin_request(self) -> RequestTransaction:
        """Start the transaction that everything in this context joins until it ends. Inside
        a test's transaction it is a savepoint of that."""
        if self._test_connection is not None:
            return RequestTransaction(
                self._test_connection, self._test_connection.begin_nested(), False
            )
        connection = self.engine.connect()
        try:
            transaction = connection.begin()
        except BaseException:
            connection.close()
            raise
        return RequestTransaction(connection, transaction, True)

    def after_commit(self, callback: Callable[..., Any], *args: Any) -> Any:
        """Run `callback(*args)` now, or once this context's request transaction has committed
        (never, if it rolls back). Returns the callback's result when it ran now, else None."""
        request = _request_transaction.get()
        if request is None:
            return callback(*args)
        request.defer(callback, args)
        return None

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

__all__ = [
    "DATABASE_ERRORS",
    "JSONB",
    "UUID",
    "Base",
    "Database",
    "RequestTransaction",
    "db",
    "now_column",
    "utcnow",
    "uuid_pk",
]
