"""The journal of a durable execution: each durable call it made, in order, and how it came out.

A run of a durable agent (workers/durable.py) numbers its calls 1, 2, 3... and looks each one up
here: a recorded call answers from its record (replay), a new one is made and recorded. Every
write is fenced by the attempt that makes it, like a finish: an attempt whose lease ran out
records nothing. A step's result is recorded in the statement that fences it, so a step either
ran and is recorded, or runs again on the next try (a step is at least once, and exactly once
when it is idempotent or its effect lives in the same database).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection

from app.db import driver


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: str
    name: str
    status: str
    result: Any
    child_execution_id: uuid.UUID | None
    due_at: dt.datetime | None
    at: dt.datetime


_ENTRY_COLUMNS = "seq, kind, name, status, result, child_execution_id, due_at, at"
_ENTRIES = f"""
    SELECT {_ENTRY_COLUMNS} FROM execution_journal WHERE execution_id = %s ORDER BY seq
"""


def entries(conn: Connection, execution_id: uuid.UUID) -> dict[int, Entry]:
    return {row[0]: Entry(*row) for row in driver(conn).execute(_ENTRIES, (execution_id,))}


def entry(conn: Connection, execution_id: uuid.UUID, seq: int) -> Entry | None:
    row = (
        driver(conn)
        .execute(
            f"SELECT {_ENTRY_COLUMNS} FROM execution_journal WHERE execution_id = %s AND seq = %s",
            (execution_id, seq),
        )
        .fetchone()
    )
    return None if row is None else Entry(*row)


class Fenced(RuntimeError):
    """The attempt no longer owns its execution (its lease ran out, or it was cancelled and
    ended): what it would record is dropped, and the run stops."""


# Fenced by the attempt, as every write after a claim.
_RECORD = """
    INSERT INTO execution_journal
        (execution_id, seq, org_id, kind, name, status, result, due_at, match)
    SELECT e.id, %(seq)s, e.org_id, %(kind)s, %(name)s, %(status)s, %(result)s,
           CASE WHEN %(until)s::timestamptz IS NOT NULL THEN %(until)s::timestamptz
                WHEN %(seconds)s::float8 IS NOT NULL
                THEN now() + make_interval(secs => %(seconds)s::float8) END,
           %(match)s
    FROM executions e
    WHERE e.id = %(id)s AND e.attempt = %(attempt)s AND e.status = 'running'
    RETURNING status, result, due_at, at
"""


def record(
    conn: Connection,
    execution_id: uuid.UUID,
    attempt: int,
    seq: int,
    kind: str,
    name: str,
    *,
    status: str,
    result: Any = None,
    seconds: float | None = None,
    until: dt.datetime | None = None,
    match: Any = None,
) -> Entry:
    """Record a call; `seconds` or `until` set its due time (a sleep, an event wait's timeout).
    Raises Fenced when the attempt no longer runs."""
    row = (
        driver(conn)
        .execute(
            _RECORD,
            {
                "id": execution_id,
                "attempt": attempt,
                "seq": seq,
                "kind": kind,
                "name": name,
                "status": status,
                "result": Jsonb(result),
                "seconds": seconds,
                "until": until,
                "match": None if match is None else Jsonb(match),
            },
        )
        .fetchone()
    )
    if row is None:
        raise Fenced(f"execution {execution_id}: attempt {attempt} no longer runs")
    return Entry(seq, kind, name, *row[:2], None, *row[2:])


_SETTLE = """
    UPDATE execution_journal j SET status = %(status)s, at = now()
    FROM executions e
    WHERE j.execution_id = %(id)s AND j.seq = %(seq)s AND j.status = 'pending'
      AND j.due_at <= now()
      AND e.id = j.execution_id AND e.attempt = %(attempt)s AND e.status = 'running'
    RETURNING j.seq
"""


def settle_pending(
    conn: Connection, execution_id: uuid.UUID, attempt: int, seq: int, status: str
) -> Entry:
    """Mark a pending sleep or event wait `status` (`done`, `timed_out`) if its time came (by
    the database's clock, which beat wakes by); the entry as it is then: still pending when
    its time has not come, `received` when an event got there first."""
    params = {"id": execution_id, "attempt": attempt, "seq": seq, "status": status}
    driver(conn).execute(_SETTLE, params)
    found = entry(conn, execution_id, seq)
    if found is None:
        raise Fenced(f"execution {execution_id}: its journal entry {seq} is gone")
    return found


def match_document(match: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """`{"order.id": 7}` as stored: `[{"path": ["order", "id"], "value": 7}]`."""
    if not match:
        return None
    if not isinstance(match, dict) or not all(isinstance(key, str) and key for key in match):
        raise TypeError("match must map dotted paths (non-empty strings) to values")
    return [{"path": path.split("."), "value": value} for path, value in match.items()]


# One data document against a stored match: every path finds its value (compared as JSON).
MATCHES = """
    NOT EXISTS (
        SELECT 1 FROM jsonb_array_elements(coalesce({match}, '[]'::jsonb)) m
        WHERE ({data} #> ARRAY(SELECT jsonb_array_elements_text(m -> 'path')))
              IS DISTINCT FROM m -> 'value')
"""
