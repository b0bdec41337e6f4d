"""The buffer an attempt's log lines go through: numbered, and written in batches."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import uuid
from typing import Any

from sqlalchemy import Connection

from app import storable
from app.db import DATABASE_ERRORS, db
from app.executions import store
from app.executions.spec import LEVELS
from workers.attempt import AttemptDatabase
from workers.secret_refs import Redactor

log = logging.getLogger(__name__)


def _jsonable(fields: dict[str, Any]) -> dict[str, Any]:
    return _storable(json.loads(json.dumps(fields, default=repr)))


def _storable(value: Any) -> Any:
    """Fields as PostgreSQL can store them: unstorable characters written out, not refused."""
    if isinstance(value, str):
        return storable.escaped(value)
    if isinstance(value, dict):
        return {storable.escaped(key): _storable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_storable(item) for item in value]
    return value


class LogBuffer:
    """Numbers log lines and writes them in batches.

    Lines may come from any thread the agent starts; the thread that owns the connection
    writes on its next add() or the final flush(), and a python agent's watchdog thread writes
    what waited past flush_seconds (`flush_if_due`) on a pooled connection of its own, so a
    line reaches PostgreSQL (and the event streams) within about flush_seconds even when the
    agent goes quiet. Writes are serialized: batches land in seq order.

    Flushes are best effort: while the database is away the lines stay pending (no more than
    max_lines in all, as ever) and the next flush tries again; the runner writes what is left
    before the outcome (write_pending), however long the database takes to come back. A flush
    that raised would end the agent (or kill a child runtime) for want of a log line.
    """

    def __init__(
        self,
        database: AttemptDatabase,
        execution_id: uuid.UUID,
        attempt: int,
        last_seq: int,
        *,
        batch_lines: int,
        flush_seconds: float,
        max_chars: int,
        max_lines: int,
        redactor: Redactor | None = None,
    ) -> None:
        self._database = database
        # The values of the secrets the execution resolved, written as [secret:<name>].
        self._redactor = redactor
        self._execution_id = execution_id
        self._attempt = attempt
        self._seq = last_seq
        self._batch_lines = batch_lines
        self._flush_seconds = flush_seconds
        self._max_chars = max_chars
        self._max_lines = max_lines
        self._kept = 0
        self._dropped = 0
        # (seq, ts, level, message, fields as JSON text or None), in seq order.
        self._pending: list[tuple[int, dt.datetime, int, str, str | None]] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._owner = threading.get_ident()
        self._last_flush = time.monotonic()
        self._held_back = False

    def add(self, level: int, message: str, fields: dict[str, Any] | None = None) -> None:
        stored_fields = _jsonable(fields) if fields else None
        if self._redactor is not None:
            # Before escaping and cutting, which could hide a value from the redactor.
            message = self._redactor.text(message)
            stored_fields = self._redactor.value(stored_fields)
        # PostgreSQL cannot hold NUL or a lone surrogate: show them, never fail the execution.
        message = storable.escaped(message)
        if len(message) > self._max_chars:
            message = message[: self._max_chars] + f" [cut: {len(message)} characters in all]"
        with self._lock:
            # A log flood is cut, not stored: the count of what was dropped closes the log.
            if self._kept >= self._max_lines:
                self._dropped += 1
                return
            self._kept += 1
            self._append(level, message, json.dumps(stored_fields) if fields else None)
            due = (
                len(self._pending) >= self._batch_lines
                or time.monotonic() - self._last_flush >= self._flush_seconds
            )
        if due and threading.get_ident() == self._owner:
            self.flush()

    def _append(self, level: int, message: str, fields: str | None) -> None:
        self._seq += 1
        self._pending.append((self._seq, dt.datetime.now(dt.UTC), level, message, fields))

    def flush_if_due(self) -> None:
        if self._pending and time.monotonic() - self._last_flush >= self._flush_seconds:
            self.flush()

    def close(self) -> None:
        """The final flush, with the line that says how much of a flood was dropped."""
        if self._dropped:
            with self._lock:
                self._append(
                    LEVELS["warning"],
                    f"dropped {self._dropped} log lines beyond max_log_lines={self._max_lines}",
                    json.dumps({"dropped_lines": self._dropped}),
                )
                self._dropped = 0
        self.flush()

    def flush(self) -> None:
        """Write the pending lines if the database takes them; else keep them for later."""
        if threading.get_ident() != self._owner:
            # The attempt's connection is its own thread's alone: another thread (the python
            # watchdog's) writes on a pooled one. Lines it cannot write stay pending.
            try:
                with db.hot() as conn:
                    self.write_pending(conn)
            except DATABASE_ERRORS:
                pass
            return
        if not self._database.worth_trying():
            return
        try:
            with self._database.connection() as conn:
                self.write_pending(conn)
        except DATABASE_ERRORS:
            if not self._held_back:
                self._held_back = True
                log.warning(
                    "execution %s: the database cannot take log lines; %d kept for later",
                    self._execution_id,
                    len(self._pending),
                    exc_info=True,
                )

    def write_pending(self, conn: Connection) -> None:
        """Write the pending lines on `conn`; if that fails they stay pending, and it raises.
        Writing a line twice is harmless (the insert skips a sequence number it holds)."""
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, []
                self._last_flush = time.monotonic()
            try:
                store.write_logs(conn, self._columns(batch))
            except BaseException:
                with self._lock:
                    self._pending[:0] = batch
                raise

    def _columns(
        self, batch: list[tuple[int, dt.datetime, int, str, str | None]]
    ) -> store.LogLines:
        columns = [list(column) for column in zip(*batch, strict=True)] or [[]] * 5
        return store.LogLines(self._execution_id, self._attempt, *columns)
