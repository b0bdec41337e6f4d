"""The database side of delivering notification events (the HTTP side: workers/notify.py).

A run claims due events (`claim`): pending, next_attempt_at passed, `FOR UPDATE SKIP LOCKED`
so two runs never take the same one. The claim counts the attempt and pushes next_attempt_at
a lease ahead: a run that dies mid-delivery leaves its events due again once the lease ends,
and no transaction stays open while a receiver answers. Delivery is at least once.

`data` (the object as the API shows it) is built from the event's subject at the first attempt
and stored, so every attempt and every redelivery sends the same body.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection, select, text
from sqlalchemy.orm import Session

from app.chains import services as chains
from app.chains.models import ChainExecution
from app.chains.schemas import ChainExecutionSchema
from app.executions import services as executions
from app.executions.models import Execution
from app.executions.schemas import ExecutionSchema
from app.notifications.services import sealing_context
from app.schedules import services as schedules
from app.schedules.models import Schedule
from app.schedules.schemas import ScheduleSchema
from app.secrets.crypto import readable

# Longer than a delivery's 10 s: an event is claimed by one run at a time.
CLAIM_LEASE_SECONDS = 60
MAX_BACKOFF_SECONDS = 3600.0

_CLAIM = """
    UPDATE notification_events e
    SET attempts = e.attempts + 1,
        next_attempt_at = now() + make_interval(secs => :lease)
    FROM notifications n
    WHERE e.id = ANY(ARRAY(
            SELECT id FROM notification_events
            WHERE status = 'pending' AND next_attempt_at <= now() {only}
            ORDER BY next_attempt_at LIMIT :limit
            FOR UPDATE SKIP LOCKED))
      AND n.id = e.notification_id
    RETURNING e.id, e.type, e.subject_id, e.data, e.created_at, e.attempts, n.url, n.secret,
              n.id AS notification_id
"""
_CLAIM_DUE = text(_CLAIM.format(only=""))
_CLAIM_THESE = text(_CLAIM.format(only="AND id = ANY(:ids)"))
_KEEP_DATA = text("UPDATE notification_events SET data = :data WHERE id = :id AND data IS NULL")
# A run's deliveries, in one statement.
# Each end of a delivery also counts in notification_totals, in the same statement.
_COUNT_ENDED = """
    INSERT INTO notification_totals AS t (status, events)
    SELECT status, count(*) FROM ended GROUP BY status
    ON CONFLICT (status) DO UPDATE SET events = t.events + excluded.events
"""
_DELIVERED = text(
    """
    WITH ended AS (
        UPDATE notification_events e
        SET status = 'delivered', delivered_at = now(), last_status_code = done.code,
            last_error = NULL
        FROM unnest(CAST(:ids AS uuid[]), CAST(:codes AS int[])) AS done(id, code)
        WHERE e.id = done.id
        RETURNING e.status
    )"""
    + _COUNT_ENDED
)
# A retry that would come after the event's window marks it failed instead.
_NOT_DELIVERED = text(
    """
    WITH changed AS (
        UPDATE notification_events
        SET last_status_code = :code, last_error = :error,
            status = CASE WHEN :final OR now() + make_interval(secs => :delay)
                                         > retry_from + make_interval(secs => :window)
                          THEN 'failed' ELSE 'pending' END,
            next_attempt_at = now() + make_interval(secs => :delay)
        WHERE id = :id
        RETURNING status
    ), ended AS (SELECT status FROM changed WHERE status = 'failed')"""
    + _COUNT_ENDED
)

# Retention: events that ended (delivered, failed) longer ago than their organization keeps
# its executions, through each subscription's log index; SKIP LOCKED leaves a row a delivery
# or a redeliver holds for the next run.
_DELETE_EXPIRED = text(
    """
    DELETE FROM notification_events WHERE id = ANY(ARRAY(
        SELECT x.id FROM notifications n
        JOIN organizations o ON o.id = n.org_id
        CROSS JOIN LATERAL (
            SELECT e.id FROM notification_events e
            WHERE e.notification_id = n.id
              AND e.created_at < now() - make_interval(days => coalesce(o.retention_days, :days))
              AND e.status IN ('delivered', 'failed')
            LIMIT :batch
            FOR UPDATE OF e SKIP LOCKED) x
        WHERE coalesce(o.retention_days, :days) > 0
        LIMIT :batch))
    """
)


def delete_expired(conn: Connection, default_days: int, batch: int) -> int:
    """Delete up to `batch` events that ended past their organization's retention."""
    return conn.execute(_DELETE_EXPIRED, {"days": default_days, "batch": batch}).rowcount


@dataclass(frozen=True)
class Due:
    """A claimed event: what to POST, where, and the key to sign it with."""

    id: uuid.UUID
    url: str
    secret: str
    body: bytes
    attempts: int


def claim(conn: Connection, limit: int, event_ids: list[uuid.UUID] | None = None) -> list[Any]:
    """Claim up to `limit` due events (only these ids, when given); commit before sending."""
    params: dict[str, Any] = {"lease": CLAIM_LEASE_SECONDS, "limit": limit}
    if event_ids is None:
        return conn.execute(_CLAIM_DUE, params).all()
    return conn.execute(_CLAIM_THESE, {**params, "ids": event_ids}).all()


def prepare(session: Session, rows: list[Any]) -> list[Due]:
    """The body of each claimed event, its `data` built (and stored) on its first attempt."""
    prepared = []
    for row in rows:
        data = row.data
        if data is None:
            data = _data_of(session, row.type, row.subject_id)
            session.execute(_KEEP_DATA, {"id": row.id, "data": Jsonb(data)})
        body = {
            "id": str(row.id),
            "type": row.type,
            "created_at": row.created_at.isoformat(),
            "data": data,
        }
        encoded = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        # Sealed at rest; a clear one left by the migration (no key then) is used as it is.
        secret = readable(row.secret, sealing_context(row.notification_id))
        prepared.append(Due(row.id, row.url, secret, encoded, row.attempts))
    return prepared


def _data_of(session: Session, event_type: str, subject_id: uuid.UUID | None) -> dict[str, Any]:
    """The subject as GET shows it now (its state then: the event is written when it ends or
    pauses). A subject deleted since (retention, a deleted schedule) is named by its id."""
    kind = event_type.split(".")[0]
    if kind == "execution":
        execution = session.get(Execution, subject_id)
        if execution is not None:
            return ExecutionSchema().dump(executions.present_in_full(session, execution))
    elif kind == "chain":
        chain_execution = session.get(ChainExecution, subject_id)
        if chain_execution is not None:
            return ChainExecutionSchema().dump(chains.present(session, chain_execution))
    elif kind == "schedule":
        schedule = session.scalar(select(Schedule).where(Schedule.id == subject_id))
        if schedule is not None:
            return ScheduleSchema().dump(schedules.present(schedule))
    return {"id": str(subject_id) if subject_id else None}


def backoff_seconds(first: float, attempts: int) -> float:
    """Exponential from `first`, doubled per attempt made, at most an hour, with equal jitter."""
    delay = min(MAX_BACKOFF_SECONDS, first * 2 ** max(0, attempts - 1))
    return delay / 2 + random.uniform(0, delay / 2)


def delivered(conn: Connection, answered: list[tuple[uuid.UUID, int]]) -> None:
    """Mark these events (id, status code) delivered."""
    if answered:
        ids, codes = zip(*answered, strict=True)
        conn.execute(_DELIVERED, {"ids": list(ids), "codes": list(codes)})


def not_delivered(
    conn: Connection,
    event_id: uuid.UUID,
    *,
    code: int | None,
    error: str,
    delay: float,
    window: float,
    final: bool = False,
) -> None:
    """Retry after `delay`, or mark it failed: when `final` (the guard refused the address) or
    once the retry would fall outside `window` seconds from its creation or redelivery."""
    conn.execute(
        _NOT_DELIVERED,
        {
            "id": event_id,
            "code": code,
            "error": error[:1000],
            "delay": delay,
            "window": window,
            "final": final,
        },
    )
