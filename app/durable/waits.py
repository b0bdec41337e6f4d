"""Waiting for events: a durable agent's ctx.wait_for_event, and the events that resume it.

A wait and an event meet under one advisory lock per organization and event name, held by the
transaction that registers the wait (and looks back for an event sent before it) and by the one
that accepts an event (and resumes the waits it matches): an event is either seen by the wait's
look-back or finds the wait registered, never neither.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection

from app.db import driver
from app.durable import journal
from app.executions import waiting

_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"


def _lock(conn: Connection, org_id: uuid.UUID, name: str) -> None:
    driver(conn).execute(_LOCK, (f"runyard:event:{org_id}:{name}",))


# The first event of that name sent within the look-back whose data matches.
_LOOK_BACK = (
    """
    SELECT data FROM events
    WHERE org_id = %(org_id)s AND name = %(name)s
      AND received_at >= now() - make_interval(secs => %(lookback)s)
      AND """
    + journal.MATCHES.format(match="%(match)s::jsonb", data="data")
    + """
    ORDER BY received_at LIMIT 1
"""
)


def register(
    conn: Connection,
    org_id: uuid.UUID,
    execution_id: uuid.UUID,
    attempt: int,
    seq: int,
    name: str,
    match: dict[str, Any] | None,
    timeout_seconds: float,
    lookback_seconds: float,
) -> journal.Entry:
    """Record a new event wait: `received` at once when an event sent within the look-back
    matches, else `pending` until an event or its timeout."""
    document = journal.match_document(match)
    pg = driver(conn)
    with pg.transaction():
        _lock(conn, org_id, name)
        found = None
        if lookback_seconds > 0:
            params = {
                "org_id": org_id,
                "name": name,
                "lookback": lookback_seconds,
                "match": None if document is None else Jsonb(document),
            }
            found = pg.execute(_LOOK_BACK, params).fetchone()
        return journal.record(
            conn,
            execution_id,
            attempt,
            seq,
            "event",
            name,
            status="pending" if found is None else "received",
            result=None if found is None else found[0],
            seconds=timeout_seconds,
            match=document,
        )


_MATCHING_WAITS = (
    """
    SELECT j.execution_id, j.seq FROM execution_journal j
    JOIN executions e ON e.id = j.execution_id
    WHERE j.org_id = %(org_id)s AND j.kind = 'event' AND j.status = 'pending'
      AND j.name = %(name)s AND """
    + journal.MATCHES.format(match="j.match", data="%(data)s::jsonb")
    + """
    ORDER BY e.id
    FOR UPDATE OF e, j
"""
)
_RECEIVED = """
    UPDATE execution_journal j SET status = 'received', result = %(data)s, at = now()
    FROM unnest(%(ids)s::uuid[], %(seqs)s::int[]) AS w(execution_id, seq)
    WHERE j.execution_id = w.execution_id AND j.seq = w.seq
"""


def resume_for_event(
    conn: Connection,
    org_id: uuid.UUID,
    event_pk: uuid.UUID,
    name: str,
    data: Any,
    received_at: dt.datetime,
) -> list:
    """In the caller's transaction (the event's): answer every pending wait the event matches
    and queue again the executions that wait on them. Returns the woken rows, for
    `publish_resumed` once committed; `resumed_ids` names every execution it answered."""
    _lock(conn, org_id, name)
    pg = driver(conn)
    params = {"org_id": org_id, "name": name, "data": Jsonb(data)}
    matched = pg.execute(_MATCHING_WAITS, params).fetchall()
    if not matched:
        return []
    ids = [row[0] for row in matched]
    pg.execute(_RECEIVED, {"data": Jsonb(data), "ids": ids, "seqs": [row[1] for row in matched]})
    woken = {row.id: row for row in waiting.wake(conn, sorted(set(ids)))}
    # An execution still running (it registered the wait and is about to suspend) is answered
    # all the same: its suspend finds the wait received and queues it again at once.
    return [woken.get(execution_id, _Answered(execution_id)) for execution_id in dict.fromkeys(ids)]


class _Answered:
    """An execution whose wait an event answered while it ran: nothing to publish."""

    gated = False

    def __init__(self, execution_id: uuid.UUID) -> None:
        self.id = execution_id


def resumed_ids(rows: list) -> list[uuid.UUID]:
    return [row.id for row in rows]


def publish_resumed(conn: Connection, rows: list) -> None:
    """Publish the executions an event woke, once its transaction committed."""
    waiting.publish_woken(conn, [row for row in rows if not isinstance(row, _Answered)])
