"""The sweeper's SQL: leases that ran out, and queued rows the broker may not hold.

Beside app/executions/store.py, the one other module that writes `executions`: the sweeper's
statements requeue or fail attempts whose worker stopped renewing their lease.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from app import outbox
from app.executions.spec import error_body
from app.executions.store import RECORD_ATTEMPT

_UNDISPATCHED = text(
    """
    SELECT id, version_id, priority FROM executions
    WHERE status = 'queued' AND dispatched_at IS NULL AND waiting_for IS NULL
      AND queued_at < now() - make_interval(secs => :grace)
    ORDER BY queued_at LIMIT :batch
    """
)

# Every queued row up to the moment the broker's loss was noticed, walked in (queued_at, id)
# order (ix_executions_queued) so a recovery cut short by the time budget goes on from where it
# stopped.
_QUEUED_SINCE_RESET = text(
    """
    SELECT id, version_id, priority, queued_at FROM executions
    WHERE status = 'queued' AND queued_at <= :horizon AND waiting_for IS NULL
      AND (queued_at, id) > (:after_queued_at, :after_id)
    ORDER BY queued_at, id LIMIT :batch
    """
)

_STALE_QUEUED = text(
    """
    SELECT id, version_id, priority FROM executions
    WHERE status = 'queued' AND dispatched_at < now() - make_interval(secs => :grace)
      -- A resumed durable run keeps its attempt but has no countdown: its message is readable.
      AND waiting_for IS NULL AND (:retries OR attempt = 0 OR resuming)
    ORDER BY queued_at, id LIMIT :batch
    """
)

# An expired attempt that goes on in a new attempt: a lost worker may have done part of the work,
# so only where the agent's retry policy says `lost` is safe to retry (`e` the execution, `v`
# its version).
_RETRIES_LOST = """(
    e.attempt < e.max_attempts AND e.cancel_requested_at IS NULL
    AND coalesce(v.retry -> 'retry_on' ? 'lost', false))"""

_EXPIRED_REQUEUE = text(
    """
    WITH ended AS (
        UPDATE executions e
        SET status = 'queued', lease_until = NULL, dispatched_at = NULL, error = :lost,
            -- Each attempt is a start: a rate-limited one waits for the window (the gates).
            waiting_for = CASE WHEN e.rate_key IS NOT NULL THEN 'agent_rate_limit' END
        FROM agent_versions v
        WHERE v.id = e.version_id
          AND e.status = 'running' AND e.lease_until < now() AND """
    + _RETRIES_LOST
    + """
        RETURNING e.id, e.attempt, e.error, e.worker, e.started_at, e.resource_usage,
                  e.version_id, e.priority, e.waiting_for
    ), recorded AS (
    """
    + RECORD_ATTEMPT.format(status="'failed'")
    + ") SELECT id, version_id, priority, waiting_for FROM ended"
).bindparams(bindparam("lost", type_=JSONB))

# After an outage: every running attempt gets one lease from now to be renewed by its worker.
_EXTEND_RUNNING_LEASES = text(
    """
    UPDATE executions SET lease_until = now() + make_interval(secs => :lease)
    WHERE status = 'running' AND lease_until < now() + make_interval(secs => :lease)
    """
)

# The expired attempts the requeue leaves, and only those: the two run as separate statements,
# each with its own now(), and a lease that runs out between them belongs to the next sweep's
# requeue, not to this end (else a retryable attempt would end `lost`).
_EXPIRED_LOST = text(
    """
    WITH ended AS (
        UPDATE executions e
        SET status = CASE WHEN e.cancel_requested_at IS NULL THEN 'failed' ELSE 'cancelled' END,
            finished_at = now(), lease_until = NULL,
            error = CASE WHEN e.cancel_requested_at IS NOT NULL THEN :cancelled
                         WHEN e.attempt < e.max_attempts THEN :not_retried ELSE :lost END
        FROM agent_versions v
        WHERE v.id = e.version_id AND e.status = 'running' AND e.lease_until < now()
          AND NOT """
    + _RETRIES_LOST
    + """
        RETURNING e.id, e.attempt, e.status, e.error, e.worker, e.started_at, e.resource_usage,
                  e.chain_execution_id, e.org_id, e.agent_id
    ), recorded AS (
    """
    + RECORD_ATTEMPT.format(status="status")
    + "), notified AS ("
    # Their notification events (app/outbox.py), delivered by beat's poll.
    + outbox.execution_fanout("ended", "'execution.' || ended.status")
    + ") SELECT id, chain_execution_id FROM ended"
).bindparams(
    bindparam("lost", type_=JSONB),
    bindparam("not_retried", type_=JSONB),
    bindparam("cancelled", type_=JSONB),
)


def requeue_expired(conn: Connection) -> list[Any]:
    """Put back in the queue the attempts whose lease ran out and whose agent retries `lost`:
    rows of (id, version_id, priority, waiting_for); a rate-limited one is held back for the
    gates (waiting_for set), the others are to be published."""
    return conn.execute(
        _EXPIRED_REQUEUE,
        {"lost": error_body("lost", "the worker's lease expired; attempt requeued")},
    ).all()


def fail_expired(conn: Connection) -> list[Any]:
    """End the other attempts whose lease ran out (`lost`, or `cancelled` when a cancel was
    asked): rows of (id, chain_execution_id)."""
    return conn.execute(
        _EXPIRED_LOST,
        {
            "lost": error_body("lost", "the worker's lease expired on the last attempt"),
            "not_retried": error_body(
                "lost",
                "the worker's lease expired, and the agent's retry policy does not list `lost`",
            ),
            "cancelled": error_body("cancelled", "cancelled while its worker was lost"),
        },
    ).all()


def extend_running(conn: Connection, lease_seconds: float) -> int:
    """Give every running attempt one lease from now; how many were extended."""
    return conn.execute(_EXTEND_RUNNING_LEASES, {"lease": lease_seconds}).rowcount


def undispatched(conn: Connection, grace_seconds: float, batch: int) -> list[Any]:
    """Queued rows committed over a grace ago and never published: (id, version_id, priority)."""
    return conn.execute(_UNDISPATCHED, {"grace": grace_seconds, "batch": batch}).all()


def stale_queued(
    conn: Connection, grace_seconds: float, batch: int, *, retries: bool = True
) -> list[Any]:
    """Queued rows published over a grace ago: (id, version_id, priority); without `retries`,
    only those never attempted."""
    return conn.execute(
        _STALE_QUEUED, {"grace": grace_seconds, "batch": batch, "retries": retries}
    ).all()


def queued_since_reset(
    conn: Connection,
    horizon: dt.datetime,
    after_queued_at: dt.datetime,
    after_id: uuid.UUID,
    batch: int,
) -> list[Any]:
    """The next queued rows up to `horizon`, after (after_queued_at, after_id):
    (id, version_id, priority, queued_at)."""
    return conn.execute(
        _QUEUED_SINCE_RESET,
        {
            "horizon": horizon,
            "after_queued_at": after_queued_at,
            "after_id": after_id,
            "batch": batch,
        },
    ).all()


def still_queued(conn: Connection, execution_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    return set(
        conn.execute(
            text("SELECT id FROM executions WHERE id = ANY(:ids) AND status = 'queued'"),
            {"ids": execution_ids},
        ).scalars()
    )


def database_now(conn: Connection) -> dt.datetime:
    return conn.execute(text("SELECT now()")).scalar()
