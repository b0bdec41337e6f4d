"""The writes that make a durable execution wait and wake (the journal itself: app/durable).

Beside store.py, leases.py and gates.py, the one module that writes `executions`.

A durable agent that must wait (for children, a sleep, an event) ends its run by `suspend`:
its row goes `running -> waiting`, holding no worker and no slot, with what wakes it: the
children it awaits (`awaiting`), the time beat wakes it (`wake_at`: a sleep's due time, an
event wait's timeout). A wake puts it back `queued` with `resuming` set, so its claim keeps the
attempt (a resume is not a retry), and publishes it; the agent then replays from its journal.

Who wakes it: the end of its last awaited child (the trigger of migration 0019, in the child's
own ending statement), an event its wait matches (app/durable/waits.py), beat (`wake_due`). Each
locks the waiting row before it reads or writes the journal, and `suspend` locks its own row
before it reads the journal: a wake and a suspend cannot miss each other. A wake that finds
the row still running does nothing: the suspend that follows sees what happened and queues the
row again at once instead of letting it wait.

A woken row a limit applies to (`gated`) is held back for its slot, as at its submit, and let
out by the gates; the others are stamped dispatched and published here.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from psycopg.types.json import Jsonb
from sqlalchemy import Connection

from app.db import driver
from app.executions import gates
from app.executions.spec import Claim
from app.executions.store import LetOut, notify_if_watched

# What a woken row becomes. A gated one is held for the gates ('org_max_running' until the
# gates say which limit holds it), the others go out at once.
_WOKEN = """
    status = 'queued', resuming = true, resumes = {row}.resumes + 1, wake_at = NULL,
    awaiting = NULL,
    waiting_for = CASE WHEN {row}.gated THEN 'org_max_running' END,
    dispatched_at = CASE WHEN {row}.gated THEN NULL ELSE now() END
"""

_LOCK_RUNNING = """
    SELECT cancel_requested_at IS NOT NULL FROM executions
    WHERE id = %(id)s AND attempt = %(attempt)s AND resumes = %(resumes)s AND status = 'running'
    FOR UPDATE
"""

# Read after the row lock, in a statement of its own (a fresh snapshot): a child's end or an
# event that committed while this waited for the lock is seen.
_ALREADY_DUE = """
    SELECT (cardinality(%(awaiting)s::uuid[]) > 0 AND NOT EXISTS (
                SELECT 1 FROM execution_journal j
                WHERE j.execution_id = %(id)s AND j.child_execution_id = ANY(%(awaiting)s)
                  AND j.status = 'pending'))
        OR coalesce(%(wake_at)s::timestamptz <= now(), false)
        OR (%(event_seq)s::int IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM execution_journal j
                WHERE j.execution_id = %(id)s AND j.seq = %(event_seq)s
                  AND j.status = 'pending'))
"""

_SUSPEND = """
    UPDATE executions
    SET status = 'waiting', lease_until = NULL, wake_at = %(wake_at)s,
        awaiting = %(awaiting)s, resource_usage = %(usage)s
    WHERE id = %(id)s AND attempt = %(attempt)s AND resumes = %(resumes)s
      AND status = 'running'
    RETURNING """ + notify_if_watched()

_REQUEUE = (
    """
    UPDATE executions SET lease_until = NULL, resource_usage = %(usage)s, """
    + _WOKEN.format(row="executions")
    + """
    WHERE id = %(id)s AND attempt = %(attempt)s AND resumes = %(resumes)s AND status = 'running'
    RETURNING id, version_id, priority, gated, org_id, """
    + notify_if_watched()
)


@dataclass(frozen=True)
class Woken:
    """A waiting row queued again, to publish once committed."""

    id: uuid.UUID
    version_id: uuid.UUID
    priority: int
    gated: bool
    org_id: uuid.UUID


@dataclass(frozen=True)
class Wait:
    """What a suspended run waits for: children (ids), a time, a pending event wait (its
    journal seq). Any one of them wakes it."""

    awaiting: list[uuid.UUID]
    wake_at: dt.datetime | None = None
    event_seq: int | None = None


def suspend(conn: Connection, claimed: Claim, wait: Wait, usage: dict) -> str | None:
    """End a run that must wait: "waiting", or "queued" when what it waits for has happened
    already (it is published again at once), or None when the row is no longer this attempt's.
    "cancel" when a cancel was asked (read under the row's lock, so none slips in between): the
    row is left running, for the caller to record the cancel."""
    pg = driver(conn)
    params = {
        "id": claimed.execution_id,
        "attempt": claimed.attempt,
        "awaiting": wait.awaiting,
        "wake_at": wait.wake_at,
        "event_seq": wait.event_seq,
        "resumes": claimed.resumes,
        "usage": Jsonb(usage),
    }
    woken: list[LetOut] = []
    with pg.transaction():
        if claimed.gated:
            # The flow lock before the row's, in the order a gated child's finish takes them
            # (flow lock, the child, then this row through the journal trigger).
            gates.lock(conn, claimed.org_id)
        locked = pg.execute(_LOCK_RUNNING, params).fetchone()
        if locked is None:
            return None
        if locked[0]:
            return "cancel"
        (due,) = pg.execute(_ALREADY_DUE, params).fetchone()
        if due:
            row = Woken(*pg.execute(_REQUEUE, params).fetchone()[:5])
            if not row.gated:
                woken.append(LetOut(row.id, row.version_id, row.priority))
            status = "queued"
        else:
            pg.execute(_SUSPEND, params)
            status = "waiting"
        if claimed.gated:  # its slot is free: the next one waiting (or itself) goes out
            woken.extend(gates.release(conn, claimed.org_id).let_out)
    gates.publish(conn, woken)
    return status


# Beat: the waits whose time came (sleeps due, event waits timed out). SKIP LOCKED: a row an
# event or a child's end is waking now is theirs.
_WAKE_DUE = (
    """
    UPDATE executions e SET """
    + _WOKEN.format(row="e")
    + """
    WHERE e.id = ANY(ARRAY(
        SELECT id FROM executions
        WHERE status = 'waiting' AND wake_at <= now()
        ORDER BY wake_at LIMIT %(batch)s
        FOR UPDATE SKIP LOCKED))
    RETURNING e.id, e.version_id, e.priority, e.gated, e.org_id, """
    + notify_if_watched("e")
)

_WAKE = (
    """
    UPDATE executions e SET """
    + _WOKEN.format(row="e")
    + """
    WHERE e.id = ANY(%(ids)s) AND e.status = 'waiting'
    RETURNING e.id, e.version_id, e.priority, e.gated, e.org_id, """
    + notify_if_watched("e")
)


def publish_woken(conn: Connection, rows: list[Woken]) -> list[uuid.UUID]:
    """Publish woken rows once committed: the plain ones at once, the gated ones through their
    organizations' gates."""
    plain = [LetOut(row.id, row.version_id, row.priority) for row in rows if not row.gated]
    for org_id in sorted({row.org_id for row in rows if row.gated}):
        plain.extend(gates.released_in_transaction(conn, org_id).let_out)
    gates.publish(conn, plain)
    return [row.id for row in rows]


def wake_due(conn: Connection, batch: int = 500) -> list[uuid.UUID]:
    """Wake the waiting executions whose time came (beat); their ids."""
    pg = driver(conn)
    with pg.transaction():
        rows = [Woken(*row[:5]) for row in pg.execute(_WAKE_DUE, {"batch": batch})]
    return publish_woken(conn, rows)


def wake(conn: Connection, ids: list[uuid.UUID]) -> list[Woken]:
    """Queue again those of `ids` that wait, in the caller's transaction (which locked them
    before it wrote what wakes them); publish the rows with `publish_woken` once committed."""
    if not ids:
        return []
    return [Woken(*row[:5]) for row in driver(conn).execute(_WAKE, {"ids": ids})]


_WOKEN_PARENT = """
    UPDATE executions SET dispatched_at = now()
    WHERE id = %(id)s AND status = 'queued' AND dispatched_at IS NULL AND waiting_for IS NULL
    RETURNING id, version_id, priority
"""
_HELD_PARENT = """
    SELECT org_id FROM executions
    WHERE id = %(id)s AND status = 'queued' AND resuming AND waiting_for IS NOT NULL
"""


def publish_parent(conn: Connection, parent_id: uuid.UUID) -> None:
    """After a child's end committed: publish its parent if that end woke it (the trigger
    queued it unpublished). A parent nobody publishes here (a child cancelled over the API, or
    failed by the sweeper) is published by the sweeper's scan for unpublished rows."""
    pg = driver(conn)
    row = pg.execute(_WOKEN_PARENT, {"id": parent_id}).fetchone()
    if row is not None:
        gates.publish(conn, [LetOut(*row)])
        return
    held = pg.execute(_HELD_PARENT, {"id": parent_id}).fetchone()
    if held is not None:
        gates.publish(conn, gates.released_in_transaction(conn, held[0]).let_out)


# ---------------------------------------------------------------------------------------------
# Cancel: a parent's unfinished descendants go with it

_UNFINISHED_DESCENDANTS = """
    WITH RECURSIVE tree(id) AS (
        SELECT id FROM executions WHERE parent_execution_id = ANY(%(ids)s)
        UNION
        SELECT e.id FROM executions e JOIN tree ON e.parent_execution_id = tree.id
    )
    SELECT e.id FROM executions e JOIN tree USING (id)
    WHERE e.status IN ('queued', 'running', 'waiting')
"""


def unfinished_descendants(conn: Connection, ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """The children, grandchildren... of `ids` that have not finished."""
    if not ids:
        return []
    return [row[0] for row in driver(conn).execute(_UNFINISHED_DESCENDANTS, {"ids": ids})]


# Driven by the children (ix_executions_parent_execution_id holds only them): a backlog of
# plain executions costs this nothing.
_ORPHANS = """
    SELECT c.id, c.org_id FROM executions c
    WHERE c.parent_execution_id IS NOT NULL
      AND c.status IN ('queued', 'running', 'waiting') AND c.cancel_requested_at IS NULL
      AND EXISTS (
          SELECT 1 FROM executions p
          WHERE p.id = c.parent_execution_id AND p.cancel_requested_at IS NOT NULL
            AND p.status IN ('succeeded', 'failed', 'timed_out', 'cancelled'))
    LIMIT %(batch)s
"""


def orphans_of_cancelled(conn: Connection, batch: int = 500) -> list:
    """Unfinished children of cancelled parents (a cancel's cascade cut short): the sweeper's."""
    return driver(conn).execute(_ORPHANS, {"batch": batch}).fetchall()
