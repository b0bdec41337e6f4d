"""ctx.progress's writes: the latest value, throttled, on the attempt's own connection.

An agent may report progress in a tight loop; PostgreSQL sees at most one write per
MIN_INTERVAL_SECONDS per execution. A value reported sooner waits (only the latest is kept) and
is written by the next report past the interval, by the child runtimes' supervision loop or the
python watchdog (`flush_if_due`, every fraction of a second), or at the latest just before the
outcome. A feature nobody uses costs nothing: no report, no statement.

Best effort, like log flushes: while the database is away a value stays pending and the next
flush tries again; a failed write never fails the agent.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any

from app.db import DATABASE_ERRORS, db
from app.executions import store
from app.executions.spec import Claim
from workers.attempt import AttemptDatabase
from workers.secret_refs import Redactor

log = logging.getLogger(__name__)

MIN_INTERVAL_SECONDS = 0.25


class ProgressReporter:
    def __init__(
        self, database: AttemptDatabase, claimed: Claim, redactor: Redactor | None = None
    ) -> None:
        self._database = database
        # The execution's secret values, written as [secret:<name>] in messages.
        self._redactor = redactor
        self._claimed = claimed
        self._owner = threading.get_ident()
        self._lock = threading.Lock()
        # Held across taking the value and writing it: two threads never write out of order.
        self._write_lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        self._written_at = 0.0
        self._warned = False

    def report(self, fraction: float, message: str | None) -> None:
        """Keep the latest value (checked by the caller: workers/context.py) and write it if
        the interval allows."""
        at = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        if message is not None and self._redactor is not None:
            message = self._redactor.text(message)
        with self._lock:
            self._pending = {"fraction": fraction, "message": message, "at": at}
        self.flush_if_due()

    def flush_if_due(self) -> None:
        if (
            self._pending is not None
            and time.monotonic() - self._written_at >= MIN_INTERVAL_SECONDS
        ):
            self.flush()

    def flush(self) -> None:
        """Write the pending value, if any: on the attempt's connection from its own thread,
        on a pooled one from another (the python watchdog's)."""
        with self._write_lock:
            with self._lock:
                pending, self._pending = self._pending, None
            if pending is None:
                return
            self._written_at = time.monotonic()
            try:
                if threading.get_ident() == self._owner:
                    if not self._database.worth_trying():
                        raise _Later
                    with self._database.connection() as conn:
                        self._write(conn, pending)
                else:
                    with db.hot() as conn:
                        self._write(conn, pending)
            except (_Later, *DATABASE_ERRORS):
                with self._lock:
                    if self._pending is None:  # no newer value came meanwhile
                        self._pending = pending
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "execution %s: progress not written yet (database away)",
                        self._claimed.execution_id,
                        exc_info=True,
                    )

    def _write(self, conn, pending: dict[str, Any]) -> None:
        store.record_progress(conn, self._claimed.execution_id, self._claimed.attempt, pending)


class _Later(Exception):
    """The database is in its pause after a failure: the value waits."""
