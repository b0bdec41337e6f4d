"""The database as one attempt sees it, from its claim to its outcome.

The claim's connection serves every statement of the attempt until the agent returns; the
outcome is recorded on a checkout of its own (workers/outcomes.py), often of the same
connection: two checkouts per execution on the hot path. A PostgreSQL restart (or a failover)
kills a connection, and every later statement on it would fail one by one, so after the first
database error the attempt takes a fresh pooled connection for each statement instead (and a
dead pool is dropped at once: `db.drop_if_dead`).

Log flushes and cancel checks are best effort while the database is away (LogBuffer.flush, the
runner's cancel check): after a failure they hold off for a pause that doubles up to
MAX_PAUSE_SECONDS, so an agent that logs does not wait on a connect timeout at every line.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection

from app.db import DATABASE_ERRORS, db

FIRST_PAUSE_SECONDS = 0.5
MAX_PAUSE_SECONDS = 5.0


class AttemptDatabase:
    """Used by one thread at a time: the one that runs the attempt, then the one that records
    its outcome (a fresh AttemptDatabase of its own)."""

    def __init__(self, claimed_on: Connection | None) -> None:
        # None: a fresh pooled connection for each block (an outcome recorded after the task).
        self._held: Connection | None = claimed_on
        self._pause = FIRST_PAUSE_SECONDS
        self._away_until = 0.0

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """The connection for the next statements: the claim's until it failed once."""
        try:
            if self._held is not None:
                yield self._held
            else:
                with db.hot() as conn:
                    yield conn
        except DATABASE_ERRORS:
            if self._held is not None:
                db.drop_if_dead(self._held)
                self._held = None
            self._away_until = time.monotonic() + self._pause
            self._pause = min(self._pause * 2, MAX_PAUSE_SECONDS)
            raise
        self._pause = FIRST_PAUSE_SECONDS

    def worth_trying(self) -> bool:
        """False during the pause after a failure: best-effort work waits for its next turn."""
        return time.monotonic() >= self._away_until
