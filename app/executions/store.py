"""Every write to executions, their attempts and their log lines (the sweeper's lease SQL apart:
app/executions/leases.py).

The hot steps (insert, claim, finish, a chain step's start) are one statement each, run on the
driver connection (`db.driver`). Every write after a claim is fenced by the attempt it claimed:
a worker whose lease ran out cannot overwrite a newer attempt's result.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from app.db import driver
from app.errors import ValidationFailed
from app.executions.spec import DEFAULT_PRIORITY, Claim, VersionSpec, error_body

# ---------------------------------------------------------------------------------------------
# Insert


@contextlib.contextmanager
def _nul_refused(pointer: str) -> Iterator[None]:
    """PostgreSQL cannot store U+0000 in jsonb: a 422 at `pointer`, not a 500."""
    try:
        yield
    except psycopg.errors.UntranslatableCharacter as exc:
        raise ValidationFailed(
            "the input holds a NUL character (\\u0000), which cannot be stored",
            errors={pointer: ["contains \\u0000"]},
            hint="remove or escape the NUL characters",
        ) from exc


# One statement: insert only if the agent is still live and (unless pinned) the version we
# validated against is still its current one. A stale cache shows up as no row, never as a
# wrong row.
@dataclass(frozen=True)
class Entry:
    """How new executions enter their queue (app/executions/gates.py decides).

    `hold`: a limit applies, so they are stored held back with this provisional reason, and the
    gates release them in the same transaction if they may start. Else `window`: the
    organization's fair window on the queue (RUNYARD_FAIR_WINDOW times its weight; 0 is off):
    one that finds that many of its organization's messages unclaimed in the queue waits in
    PostgreSQL (`queue`) until a claim makes room (see claim)."""

    window: int = 0
    hold: str | None = None


FREE = Entry()

# The waiting_for of a new row: its hold, or `queue` when its organization has a full window
# of unclaimed messages on the queue. The count stops at the window (ix_executions_org_id_queue_
# unclaimed): an execution no limit touches pays a few index entries, not a round trip. `rank`
# is the row's place among those the statement inserts for that organization and queue.
WAITING_FOR_SQL = """CASE
        WHEN %(hold)s::text IS NOT NULL THEN %(hold)s::text
        WHEN %(window)s::int > 0 AND {rank} + (
            SELECT count(*) FROM (
                SELECT 1 FROM executions u
                WHERE u.org_id = %(org_id)s AND u.queue = %(queue)s::text AND u.status = 'queued'
                  AND u.waiting_for IS NULL
                LIMIT %(window)s::int) w
        ) > %(window)s::int THEN 'queue'
    END"""

_INSERT_SQL = (
    """
    INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version, status,
                            priority, input, attempt, max_attempts, queue, waiting_for, flow_key,
                            rate_key, gated)
    SELECT %(id)s, a.org_id, a.id, %(version_id)s, a.name, %(version)s, 'queued', %(priority)s,
           %(input)s, 0, %(max_attempts)s, %(queue)s::text, """
    + WAITING_FOR_SQL.format(rank="1")
    + """,
           %(flow_key)s, %(rate_key)s, %(hold)s::text IS NOT NULL
    FROM agents a
    WHERE a.id = %(agent_id)s AND a.org_id = %(org_id)s AND a.archived_at IS NULL
      AND (%(pinned)s OR a.current_version_id = %(version_id)s)
    RETURNING queued_at, waiting_for
"""
)


def insert(
    conn: Connection,
    execution_id: uuid.UUID,
    org_id: uuid.UUID,
    spec: VersionSpec,
    payload: dict[str, Any],
    *,
    priority: int,
    pinned: bool,
    entry: Entry = FREE,
) -> Any:
    """Insert a queued execution; a row of (queued_at, waiting_for), or None when the agent was
    archived or (unless pinned) its current version changed since `spec` was read."""
    with _nul_refused("/input"):
        row = (
            driver(conn)
            .execute(
                _INSERT_SQL,
                {
                    "id": execution_id,
                    "org_id": org_id,
                    "agent_id": spec.agent_id,
                    "version_id": spec.id,
                    "version": spec.version,
                    "priority": priority,
                    "input": Jsonb(payload),
                    "max_attempts": spec.max_attempts,
                    "pinned": pinned,
                    "queue": spec.queue,
                    "flow_key": spec.flow_key(payload),
                    "rate_key": spec.rate_key(payload),
                    "hold": entry.hold,
                    "window": entry.window,
                },
            )
            .fetchone()
        )
    return row


# A batch: one statement for every item, on the same condition as a single insert, so the batch
# is stored whole or not at all (a stale cache shows up as no rows). Each item takes its place
# in the fair window in item order.
_INSERT_BATCH_SQL = (
    """
    INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version, status,
                            priority, input, attempt, max_attempts, queue, waiting_for, flow_key,
                            rate_key, gated)
    SELECT r.id, a.org_id, a.id, %(version_id)s, a.name, %(version)s, 'queued', r.priority,
           r.input, 0, %(max_attempts)s, %(queue)s::text, """
    + WAITING_FOR_SQL.format(rank="r.rank")
    + """,
           r.flow_key, r.rate_key, %(hold)s::text IS NOT NULL
    FROM agents a,
         ROWS FROM (json_to_recordset(%(rows)s::json)
                    AS (id uuid, priority smallint, input jsonb, flow_key text, rate_key text))
         WITH ORDINALITY AS r(id, priority, input, flow_key, rate_key, rank)
    WHERE a.id = %(agent_id)s AND a.org_id = %(org_id)s AND a.archived_at IS NULL
      AND (%(pinned)s OR a.current_version_id = %(version_id)s)
    RETURNING id, waiting_for
"""
)


def insert_batch(
    conn: Connection,
    org_id: uuid.UUID,
    spec: VersionSpec,
    rows: list[tuple[uuid.UUID, int, dict[str, Any]]],
    *,
    pinned: bool,
    entry: Entry = FREE,
) -> dict[uuid.UUID, str | None] | None:
    """Insert (id, priority, input) rows as queued executions of `spec`, all or none: id ->
    waiting_for, or None when the agent was archived or (unless pinned) its current version
    changed since `spec` was read."""
    document = json.dumps(
        [
            {
                "id": str(row_id),
                "priority": priority,
                "input": payload,
                "flow_key": spec.flow_key(payload),
                "rate_key": spec.rate_key(payload),
            }
            for row_id, priority, payload in rows
        ]
    )
    with _nul_refused("/items"):
        inserted = (
            driver(conn)
            .execute(
                _INSERT_BATCH_SQL,
                {
                    "org_id": org_id,
                    "agent_id": spec.agent_id,
                    "version_id": spec.id,
                    "version": spec.version,
                    "max_attempts": spec.max_attempts,
                    "pinned": pinned,
                    "rows": document,
                    "queue": spec.queue,
                    "hold": entry.hold,
                    "window": entry.window,
                },
            )
            .fetchall()
        )
    if len(inserted) != len(rows):
        return None
    return dict(inserted)


@dataclass(frozen=True)
class NewExecution:
    id: uuid.UUID
    org_id: uuid.UUID
    spec: VersionSpec
    input: dict[str, Any]
    priority: int = DEFAULT_PRIORITY
    entry: Entry = FREE


# One JSON document for all rows: PostgreSQL unpacks it in C, where binding one array per column
# cost more in the driver than the INSERT itself (10,000 rows, bench/schedules.py). Rows take
# their places in their organization's fair window on their queue in document order.
_INSERT_MANY_SQL = """
    WITH r AS (
        SELECT r.*, row_number() OVER (PARTITION BY r.org_id, r.queue ORDER BY r.rank) AS place
        FROM ROWS FROM (json_to_recordset(%(rows)s::json)
             AS (id uuid, org_id uuid, agent_id uuid, version_id uuid, agent_name text,
                 agent_version text, priority smallint, input jsonb, max_attempts int,
                 queue text, hold text, fair_window int, flow_key text, rate_key text))
             WITH ORDINALITY AS r(id, org_id, agent_id, version_id, agent_name, agent_version,
                                  priority, input, max_attempts, queue, hold, fair_window,
                                  flow_key, rate_key, rank)
    )
    INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version, status,
                            priority, input, attempt, max_attempts, queue, waiting_for, flow_key,
                            rate_key, gated)
    SELECT r.id, r.org_id, r.agent_id, r.version_id, r.agent_name, r.agent_version, 'queued',
           r.priority, r.input, 0, r.max_attempts, r.queue,
           CASE
               WHEN r.hold IS NOT NULL THEN r.hold
               WHEN r.fair_window > 0 AND r.place + (
                   SELECT count(*) FROM (
                       SELECT 1 FROM executions u
                       WHERE u.org_id = r.org_id AND u.queue = r.queue AND u.status = 'queued'
                         AND u.waiting_for IS NULL
                       LIMIT r.fair_window) w
               ) > r.fair_window THEN 'queue'
           END,
           r.flow_key, r.rate_key, r.hold IS NOT NULL
    FROM r
    RETURNING id, waiting_for
"""


def insert_many(conn: Connection, rows: list[NewExecution]) -> dict[uuid.UUID, str | None]:
    """Insert queued executions with one statement, in the caller's transaction: id ->
    waiting_for."""
    document = json.dumps(
        [
            {
                "id": str(row.id),
                "org_id": str(row.org_id),
                "agent_id": str(row.spec.agent_id),
                "version_id": str(row.spec.id),
                "agent_name": row.spec.agent_name,
                "agent_version": row.spec.version,
                "priority": row.priority,
                "input": row.input,
                "max_attempts": row.spec.max_attempts,
                "queue": row.spec.queue,
                "hold": row.entry.hold,
                "fair_window": row.entry.window,
                "flow_key": row.spec.flow_key(row.input),
                "rate_key": row.spec.rate_key(row.input),
            }
            for row in rows
        ]
    )
    return dict(driver(conn).execute(_INSERT_MANY_SQL, {"rows": document}).fetchall())


# A chain step's row, `queued` to run or already `failed` when it is refused, created by the
# step task once its turn has come. The insert locks the chain execution's row FOR KEY SHARE
# (the lock the foreign key takes anyway): a reconcile or a cancel holds it FOR UPDATE while it
# stops the chain, so an insert either lands before (and is seen as under way) or waits and
# then finds the chain stopped.
_INSERT_STEP_SQL = """
    INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version, status,
                            priority, input, attempt, max_attempts, dispatched_at, error,
                            finished_at, chain_execution_id, chain_step, chain_stage, chain_role,
                            queue)
    SELECT %(id)s, ce.org_id, %(agent_id)s, %(version_id)s, %(agent_name)s, %(agent_version)s,
           %(status)s, ce.priority, %(input)s, 0, %(max_attempts)s, now(), %(error)s,
           CASE WHEN %(refused)s THEN now() END, ce.id, %(step)s, %(stage)s, %(role)s,
           %(queue)s
    FROM chain_executions ce
    WHERE ce.id = %(chain_execution_id)s AND ce.status = ANY(%(statuses)s)
    FOR KEY SHARE OF ce
    ON CONFLICT (id) DO NOTHING
    RETURNING id
"""


@dataclass(frozen=True)
class NewStep:
    execution_id: uuid.UUID
    chain_execution_id: uuid.UUID
    spec: VersionSpec
    input: dict[str, Any]
    step: int
    stage: int
    role: str
    # Set when the step is refused: the row is written `failed` with this error.
    error: dict[str, Any] | None


def insert_step(conn: Connection, new: NewStep, chain_statuses: list[str]) -> bool:
    """Insert a chain step's row while its chain execution is in one of `chain_statuses`;
    False when it was not (or the row exists already)."""
    started = (
        driver(conn)
        .execute(
            _INSERT_STEP_SQL,
            {
                "id": new.execution_id,
                "chain_execution_id": new.chain_execution_id,
                "agent_id": new.spec.agent_id,
                "version_id": new.spec.id,
                "agent_name": new.spec.agent_name,
                "agent_version": new.spec.version,
                "status": "failed" if new.error else "queued",
                "refused": new.error is not None,
                "input": Jsonb(new.input),
                "max_attempts": new.spec.max_attempts,
                "error": Jsonb(new.error) if new.error else None,
                "step": new.step,
                "stage": new.stage,
                "role": new.role,
                "statuses": chain_statuses,
                "queue": new.spec.queue,
            },
        )
        .fetchone()
    )
    return started is not None


def stamp_dispatched(conn: Connection, ids: list[uuid.UUID]) -> None:
    conn.execute(
        # Rows a worker claimed meanwhile carry the stamp already: skip the write.
        text(
            "UPDATE executions SET dispatched_at = now() "
            "WHERE id = ANY(:ids) AND dispatched_at IS NULL"
        ),
        {"ids": ids},
    )


# ---------------------------------------------------------------------------------------------
# Claim, renew, finish (the worker side)


# The claim also makes room in the fair window: the message it took leaves the broker, so the
# organization's next execution held back on that queue (`queue`, by priority then age) is let
# out in the same statement, to be published by the worker. With nothing held back that is one
# probe of an empty index range (ix_executions_org_id_queue_waiting).
_CLAIM_SQL = """
    WITH claimed AS (
        UPDATE executions
        SET status = 'running', attempt = attempt + 1, started_at = now(), worker = %(worker)s,
            resource_usage = NULL,
            dispatched_at = coalesce(dispatched_at, now()),
            lease_until = now() + make_interval(secs => %(lease)s)
        WHERE id = %(id)s AND status = 'queued' AND waiting_for IS NULL
        RETURNING attempt, version_id, input, priority, chain_execution_id, org_id, gated, queue
    ), let_out AS (
        UPDATE executions e SET waiting_for = NULL, dispatched_at = now()
        WHERE e.id = (
            SELECT h.id FROM executions h, claimed c
            WHERE h.org_id = c.org_id AND h.queue = c.queue AND h.status = 'queued'
              AND h.waiting_for = 'queue'
            ORDER BY h.priority DESC, h.queued_at
            LIMIT 1 FOR UPDATE OF h SKIP LOCKED)
        RETURNING e.id, e.version_id, e.priority
    )
    SELECT c.attempt, c.version_id, c.input, c.priority,
           (SELECT coalesce(max(seq), 0) FROM execution_logs WHERE execution_id = %(id)s),
           c.chain_execution_id, c.org_id, c.gated,
           (SELECT array_agg(ARRAY[l.id::text, l.version_id::text, l.priority::text])
            FROM let_out l)
    FROM claimed c
"""


@dataclass(frozen=True)
class LetOut:
    """An execution a claim or a release let out: publish it (it is stamped dispatched)."""

    execution_id: uuid.UUID
    version_id: uuid.UUID
    priority: int


def claim(
    conn: Connection, execution_id: uuid.UUID, worker: str, lease_seconds: float
) -> tuple[Claim | None, list[LetOut]]:
    """Take a queued execution, and the execution the claim let out of the fair window. A None
    claim means the message is a duplicate or stale: drop it.

    The lease is short (RUNYARD_LEASE_SECONDS) and the worker renews it while the attempt runs
    (`renew_leases`); once it runs out the sweeper takes the execution back."""
    row = (
        driver(conn)
        .execute(_CLAIM_SQL, {"id": execution_id, "worker": worker, "lease": lease_seconds})
        .fetchone()
    )
    if row is None:
        return None, []
    *fields, let_out = row
    return Claim(execution_id, *fields), [
        LetOut(uuid.UUID(out_id), uuid.UUID(version_id), int(priority))
        for out_id, version_id, priority in let_out or ()
    ]


# One statement for every attempt a worker process holds, fenced by the attempt like a finish:
# an attempt the sweeper took back (or that ended) is not renewed and does not come back.
_RENEW_LEASES_SQL = """
    UPDATE executions e
    SET lease_until = now() + make_interval(secs => %(lease)s)
    FROM unnest(%(ids)s::uuid[], %(attempts)s::int[]) AS held(id, attempt)
    WHERE e.id = held.id AND e.attempt = held.attempt AND e.status = 'running'
    RETURNING e.id
"""


def renew_leases(conn: Connection, held: list[Claim], lease_seconds: float) -> set[uuid.UUID]:
    """Extend the leases of the attempts a worker runs; the ids whose attempt it still owns."""
    if not held:
        return set()
    rows = (
        driver(conn)
        .execute(
            _RENEW_LEASES_SQL,
            {
                "ids": [claimed.execution_id for claimed in held],
                "attempts": [claimed.attempt for claimed in held],
                "lease": lease_seconds,
            },
        )
        .fetchall()
    )
    return {row[0] for row in rows}


# A statement that ends an attempt the execution goes on from (a retry, a lost worker) records
# it in execution_attempts in the same round trip. The final attempt is the execution row
# itself, so the common finish stays one UPDATE (see services.attempts).
RECORD_ATTEMPT = """
    INSERT INTO execution_attempts
        (execution_id, attempt, status, error, worker, started_at, finished_at, resource_usage)
    SELECT id, attempt, {status}, error, worker, started_at, now(), resource_usage FROM ended
    ON CONFLICT (execution_id, attempt) DO UPDATE
    SET status = excluded.status, error = excluded.error, worker = excluded.worker,
        started_at = excluded.started_at, finished_at = excluded.finished_at,
        resource_usage = excluded.resource_usage
"""

_FINISH_SQL = """
    UPDATE executions
    SET status = %(status)s, output = %(output)s, resource_usage = %(usage)s,
        finished_at = now(), lease_until = NULL,
        -- A cancel that a newer execution asked for (concurrency.on_limit cancel_running) says so.
        error = CASE WHEN %(cancelled)s AND error ->> 'type' = 'superseded'
                     THEN error ELSE %(error)s END
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
"""


def _jsonb(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)


def finish(
    conn: Connection,
    claimed: Claim,
    *,
    status: str,
    output: dict[str, Any] | None,
    error: dict[str, Any] | None,
    usage: dict[str, Any],
) -> bool:
    """Record the outcome, fenced by the attempt: False means a newer attempt owns the row."""
    cursor = driver(conn).execute(
        _FINISH_SQL,
        {
            "id": claimed.execution_id,
            "attempt": claimed.attempt,
            "status": status,
            "cancelled": status == "cancelled",
            "output": _jsonb(output),
            "error": _jsonb(error),
            "usage": Jsonb(usage),
        },
    )
    return cursor.rowcount == 1


_RETRY_SQL = text(
    """
    WITH ended AS (
        UPDATE executions
        SET status = 'queued', error = :error, resource_usage = :usage, lease_until = NULL,
            dispatched_at = NULL
        WHERE id = :id AND attempt = :attempt AND status = 'running'
          AND cancel_requested_at IS NULL
        RETURNING id, attempt, error, worker, started_at, resource_usage
    )
    """
    + RECORD_ATTEMPT.format(status=":attempt_status")
).bindparams(bindparam("error", type_=JSONB), bindparam("usage", type_=JSONB))


def requeue_for_retry(
    conn: Connection,
    claimed: Claim,
    *,
    attempt_status: str,
    error: dict[str, Any],
    usage: dict[str, Any],
) -> bool:
    """Put a failed attempt back in the queue; the caller publishes it with its backoff."""
    result = conn.execute(
        _RETRY_SQL,
        {
            "id": claimed.execution_id,
            "attempt": claimed.attempt,
            "attempt_status": attempt_status,
            "error": error,
            "usage": usage,
        },
    )
    return result.rowcount == 1


_LOG_INSERT = text(
    """
    INSERT INTO execution_logs (execution_id, seq, attempt, ts, level, message, fields)
    SELECT :execution_id, :seq, :attempt, :ts, :level, :message, :fields
    -- Fenced like every write after the claim: a stale attempt's lines are dropped.
    WHERE EXISTS (SELECT 1 FROM executions WHERE id = :execution_id AND attempt = :attempt)
    ON CONFLICT DO NOTHING
    """
).bindparams(bindparam("fields", type_=JSONB))


def write_logs(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn.execute(_LOG_INSERT, rows)


def cancel_requested(conn: Connection, execution_id: uuid.UUID) -> bool:
    return bool(
        conn.execute(
            text("SELECT cancel_requested_at IS NOT NULL FROM executions WHERE id = :id"),
            {"id": execution_id},
        ).scalar()
    )


# ---------------------------------------------------------------------------------------------
# Cancel


# One statement for both states: a retry or the sweeper may put a running execution back to
# `queued` at any moment, and two statements (queued, then running) could both miss it and
# answer 409 while the retry goes on. A queued execution ends here; a running one is asked to
# stop (its worker records the end). SET reads the row as it was; RETURNING, as it is now.
_CANCEL = text(
    """
    UPDATE executions
    SET status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
        cancel_requested_at = CASE
            WHEN status = 'queued' THEN now() ELSE coalesce(cancel_requested_at, now()) END,
        finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
        lease_until = CASE WHEN status = 'queued' THEN NULL ELSE lease_until END,
        error = CASE WHEN status = 'queued' THEN :error ELSE error END,
        waiting_for = NULL
    WHERE id = :id AND org_id = :org_id AND status IN ('queued', 'running')
    RETURNING id, chain_execution_id, status = 'cancelled' AS ended, gated
    """
).bindparams(bindparam("error", type_=JSONB))


def cancel(conn: Connection, org_id: uuid.UUID, execution_id: uuid.UUID, message: str) -> Any:
    """End a queued execution, or ask a running one to stop. None when it had finished; else a
    row with `chain_execution_id`, `ended` (true when it ended here) and `gated` (a limit
    applied: an end here may free a slot)."""
    params = {"id": execution_id, "org_id": org_id, "error": error_body("cancelled", message)}
    return conn.execute(_CANCEL, params).first()


def note_cancelled_with_chain(conn: Connection, chain_execution_id: uuid.UUID) -> None:
    """A step that was running when its chain was cancelled was stopped by its worker, which
    tells how (the chain is not its business): say why, keeping how."""
    conn.execute(
        text(
            "UPDATE executions SET error = jsonb_set(error, '{message}', to_jsonb("
            "concat('cancelled with its chain (', error ->> 'message', ')'))) "
            "WHERE chain_execution_id = :id AND status = 'cancelled' "
            "AND error ->> 'message' NOT LIKE 'cancelled with its chain%' "
            # Not a step cancelled on its own before the chain was.
            "AND finished_at >= (SELECT finished_at FROM chain_executions WHERE id = :id)"
        ),
        {"id": chain_execution_id},
    )
