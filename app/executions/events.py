"""Live events (Server-Sent Events) of executions, and the one listener per API process that
wakes the streams.

An open stream holds one thread of `runyard api` (threads of their own: RUNYARD_MAX_STREAMS_
PER_PROCESS beside RUNYARD_API_THREADS, a semaphore caps them) but no database connection while
it waits: it sleeps on an Event until something changed, then reads what is new on a pooled
connection for one short checkout and gives the connection back.

What wakes it: per process, ONE thread (`Hub`) holds ONE PostgreSQL connection that
`LISTEN runyard_events`. The worker's statements that change a watched execution (claim,
finish, retry, cancel, a log flush, ctx.progress; app/executions/store.py) NOTIFY with the
execution id in the same statement, and only while a stream watches it (`watched_until`): an
execution nobody watches pays nothing. NOTIFY is transactional: it goes out when the change
commits, never before, so a woken stream always finds the change it was told of.

Changes made by statements that do not NOTIFY (the sweeper taking a lost attempt back, flow
control letting a held execution out) and notifications lost while the listener reconnects
are caught by the same thread's safety poll: every POLL_SECONDS one query reads the state of
every execution this process watches (status, attempt, waiting_for, progress, last log seq)
and wakes the streams whose state differs from what it last saw. Chain streams use that poll
only (app/chains/events.py registers theirs, every second).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import select

from app.config import current_config
from app.db import db, driver
from app.errors import Unavailable
from app.executions import store
from app.executions.logs import line as line_entry
from app.executions.models import Execution, ExecutionLog
from app.executions.schemas import ExecutionSchema, LogLineSchema
from app.executions.services import present_in_full, shown_waiting_for
from app.executions.spec import TERMINAL_STATUSES

log = logging.getLogger(__name__)

# The listener's beat: how long it waits for notifications before it looks at its polls.
LISTEN_SECONDS = 0.5
# The safety poll of watched executions (what does not NOTIFY is seen within this).
POLL_SECONDS = 5.0
# A stream marks its execution watched for this long; the listener renews it while it is open.
WATCH_SECONDS = 120.0
RENEW_SECONDS = 30.0
RECONNECT_MAX_SECONDS = 5.0
LINES_PER_READ = 1000
RETRY_AFTER_SECONDS = 5

EXECUTION = "execution"
STREAMS_FULL = (
    "this API process serves RUNYARD_MAX_STREAMS_PER_PROCESS streams already: retry after "
    "Retry-After seconds"
)
STREAMS_FULL_HEADERS = {
    "Retry-After": {
        "description": "seconds to wait before opening a stream again",
        "schema": {"type": "integer"},
    }
}


def stream_doc(events: list[str]) -> dict[str, Any]:
    """The OpenAPI answer of a stream route: Server-Sent Events (each described as an object
    of its fields), not JSON."""
    event = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "enum": events},
            "data": {"type": "string", "description": "one line of JSON"},
            "id": {"type": "string", "description": "a log line's seq (Last-Event-ID)"},
        },
    }
    return {
        "200": {
            "description": "Server-Sent Events, until `end`",
            "content": {"text/event-stream": {"schema": event}},
        }
    }


class StreamsBusy(Unavailable):
    """503: this API process serves as many event streams as it may."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this API process already serves {limit} event streams "
            "(RUNYARD_MAX_STREAMS_PER_PROCESS)",
            hint=f"retry after {RETRY_AFTER_SECONDS} s, poll GET /api/v1/executions/{{id}} and "
            "/logs?after_seq= instead, or raise RUNYARD_MAX_STREAMS_PER_PROCESS",
        )
        self.headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}


class Watcher:
    """One open stream's doorbell."""

    def __init__(self, kind: str, object_id: uuid.UUID) -> None:
        self.key = (kind, object_id)
        self._event = threading.Event()

    def wake(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """Sleep until woken or `timeout`; True when woken."""
        woken = self._event.wait(timeout)
        self._event.clear()
        return woken


# A poll: the ids of the open streams of one kind -> a signature of each one's state. A
# signature that changed wakes that stream.
Signatures = Callable[[psycopg.Connection, list[uuid.UUID]], dict[uuid.UUID, Any]]


@dataclass
class _Poll:
    every: float
    signatures: Signatures
    next_at: float = 0.0


_STATE_SQL = """
    SELECT e.id, e.status, e.attempt, e.waiting_for, e.progress,
           (SELECT max(l.seq) FROM execution_logs l WHERE l.execution_id = e.id)
    FROM executions e WHERE e.id = ANY(%s)
"""


def _execution_signatures(pg: psycopg.Connection, ids: list[uuid.UUID]) -> dict:
    return {row[0]: row[1:] for row in pg.execute(_STATE_SQL, (ids,))}


class Hub:
    """The streams open in this process, and the thread that wakes them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watchers: dict[tuple[str, uuid.UUID], set[Watcher]] = {}
        self._seen: dict[tuple[str, uuid.UUID], Any] = {}
        self._polls: dict[str, _Poll] = {EXECUTION: _Poll(POLL_SECONDS, _execution_signatures)}
        self._pid = 0
        self._slots: threading.BoundedSemaphore | None = None
        self._limit = 0
        self._renew_at = 0.0
        self._stopped = threading.Event()

    def add_poll(self, kind: str, every: float, signatures: Signatures) -> None:
        self._polls[kind] = _Poll(every, signatures)

    def _fresh(self) -> None:
        """After a fork (gunicorn's workers), the parent's thread and slots are not ours."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._limit = current_config().max_streams_per_process
            self._slots = threading.BoundedSemaphore(self._limit)
            self._watchers.clear()
            self._seen.clear()
            threading.Thread(target=self._run, name="runyard-events", daemon=True).start()

    def take_slot(self) -> None:
        """Reserve one of this process's stream slots, or answer 503 (StreamsBusy)."""
        with self._lock:
            self._fresh()
        assert self._slots is not None
        if not self._slots.acquire(blocking=False):
            raise StreamsBusy(self._limit)

    def give_slot(self) -> None:
        assert self._slots is not None
        self._slots.release()

    def watch(self, kind: str, object_id: uuid.UUID) -> Watcher:
        watcher = Watcher(kind, object_id)
        with self._lock:
            self._watchers.setdefault(watcher.key, set()).add(watcher)
        return watcher

    def forget(self, watcher: Watcher) -> None:
        with self._lock:
            watchers = self._watchers.get(watcher.key)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[watcher.key]
                    self._seen.pop(watcher.key, None)

    def _wake(self, key: tuple[str, uuid.UUID]) -> None:
        with self._lock:
            watchers = list(self._watchers.get(key, ()))
        for watcher in watchers:
            watcher.wake()

    def _wake_all(self) -> None:
        with self._lock:
            watchers = [w for group in self._watchers.values() for w in group]
        for watcher in watchers:
            watcher.wake()

    def _ids(self, kind: str) -> list[uuid.UUID]:
        with self._lock:
            return [object_id for (k, object_id) in self._watchers if k == kind]

    def stop(self) -> None:
        """End the listener for good, before its database goes away (the end of a test run):
        it would otherwise reconnect, and say so, until the process exits."""
        self._stopped.set()

    def _run(self) -> None:
        pause = LISTEN_SECONDS
        while not self._stopped.is_set():
            try:
                self._listen()
            except Exception as exc:
                if self._stopped.is_set():
                    return
                # Without a traceback: a restart of PostgreSQL is expected, and each try logs.
                log.warning("event listener lost its connection (%s); reconnecting", exc)
            # Whatever was notified meanwhile is lost: every stream looks for itself.
            self._wake_all()
            time.sleep(pause)
            pause = min(pause * 2, RECONNECT_MAX_SECONDS)

    def _listen(self) -> None:
        url = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(
            url, autocommit=True, connect_timeout=5, options="-c statement_timeout=8000"
        ) as pg:
            pg.execute(f"LISTEN {store.EVENTS_CHANNEL}")
            self._wake_all()  # anything that happened before LISTEN took effect
            while not self._stopped.is_set():
                for note in pg.notifies(timeout=LISTEN_SECONDS):
                    try:
                        self._wake((EXECUTION, uuid.UUID(note.payload)))
                    except ValueError:
                        continue
                self._tick(pg)

    def _tick(self, pg: psycopg.Connection) -> None:
        now = time.monotonic()
        for kind, poll in self._polls.items():
            if now < poll.next_at:
                continue
            poll.next_at = now + poll.every
            ids = self._ids(kind)
            if not ids:
                continue
            signatures = poll.signatures(pg, ids)
            for object_id in ids:
                key = (kind, object_id)
                signature = signatures.get(object_id)
                with self._lock:
                    changed = key in self._watchers and self._seen.get(key) != signature
                    if changed:
                        self._seen[key] = signature
                if changed:
                    self._wake(key)
        if now >= self._renew_at:
            self._renew_at = now + RENEW_SECONDS
            store.watch(pg, self._ids(EXECUTION), WATCH_SECONDS)


hub = Hub()


def sse(event: str, data: Any, event_id: int | None = None) -> str:
    """One Server-Sent Event; the JSON holds no raw newline, so `data` is one line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


KEEPALIVE = ": keepalive\n\n"


class Stream:
    """The body of an event stream answer: the events `produce(watcher)` yields, and the slot
    and watcher given back however it ends (finished, or the client went away: the server
    closes the body then, started or not)."""

    def __init__(
        self, kind: str, object_id: uuid.UUID, produce: Callable[[Watcher], Iterator[str]]
    ) -> None:
        hub.take_slot()
        self._watcher = hub.watch(kind, object_id)
        self._events = produce(self._watcher)
        self._closed = False

    def __iter__(self) -> Iterator[str]:
        return self._events

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._events.close()  # type: ignore[attr-defined]
        finally:
            hub.forget(self._watcher)
            hub.give_slot()


def waited(watcher: Watcher, keepalive: float, last_sent: float) -> tuple[bool, float]:
    """Sleep until woken or a keepalive is due: (woken, when the keepalive clock restarts)."""
    remaining = keepalive - (time.monotonic() - last_sent)
    if remaining > 0 and watcher.wait(remaining):
        return True, last_sent
    return False, time.monotonic()


def execution_events(
    org_id: uuid.UUID, execution_id: uuid.UUID, after_seq: int
) -> Callable[[Watcher], Iterator[str]]:
    """The events of one execution after log line `after_seq`: the history, then live, then
    `end` (see API.md "Live events")."""
    keepalive = current_config().stream_keepalive_seconds
    line_schema, execution_schema = LogLineSchema(), ExecutionSchema()

    def produce(watcher: Watcher) -> Iterator[str]:
        nonlocal after_seq
        shown: dict[str, Any] | None = None
        first = True
        last_sent = time.monotonic()
        while True:
            row, lines = _read(org_id, execution_id, after_seq, watch=first)
            first = False
            if row is None:
                return  # deleted (retention) while watched: nothing more will come
            for line in lines:
                after_seq = line.seq
                yield sse("log", line_schema.dump(line_entry(line)), after_seq)
            if len(lines) == LINES_PER_READ:
                continue  # more history: read on before looking at the status
            state = {
                "status": row["status"],
                "attempt": row["attempt"],
                "progress": row["progress"],
                "waiting_for": shown_waiting_for(row["waiting_for"]),
            }
            sent = bool(lines)
            if state != shown:
                shown, sent = state, True
                yield sse("status", state)
            if row["status"] in TERMINAL_STATUSES:
                with db.hot() as conn:
                    shown_in_full = present_in_full(conn, row)
                yield sse("end", execution_schema.dump(shown_in_full))
                return
            if sent:
                last_sent = time.monotonic()
            woken, last_sent = waited(watcher, keepalive, last_sent)
            if not woken:
                yield KEEPALIVE

    return produce


def _read(
    org_id: uuid.UUID, execution_id: uuid.UUID, after_seq: int, *, watch: bool
) -> tuple[Any, list[Any]]:
    """The execution row and its next log lines, on one short checkout. The row is read first:
    a finished execution's lines are all written before its finish (the runner writes them
    first), so the lines read after a terminal row are the last ones."""
    with db.hot() as conn:
        if watch:
            # Before the first read: from here on its changes NOTIFY, and the read sees
            # everything before.
            store.watch(driver(conn), [execution_id], WATCH_SECONDS)
        row = (
            conn.execute(
                select(Execution.__table__).where(
                    Execution.id == execution_id, Execution.org_id == org_id
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            return None, []
        lines = conn.execute(
            select(ExecutionLog.__table__)
            .where(ExecutionLog.execution_id == execution_id, ExecutionLog.seq > after_seq)
            .order_by(ExecutionLog.seq)
            .limit(LINES_PER_READ)
        ).all()
    return row, list(lines)
