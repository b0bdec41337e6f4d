"""How executions enter: every insert of an execution row (an API submit, a batch, the runs of
schedules and webhooks, a chain's step), with the place each takes in its organization's fair
window or the limit that holds it back (app/executions/gates.py decides which), and the
dispatch stamp of published rows.

Beside store.py (the worker's side and cancels), leases.py and gates.py, the one module that
writes `executions`. Each insert is one statement, on the driver connection (`db.driver`).
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
from sqlalchemy import Connection, text

from app.audit import services as audit
from app.db import driver
from app.errors import ValidationFailed
from app.executions.spec import DEFAULT_PRIORITY, VersionSpec


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
# The created_by columns of what Runyard makes itself (schedule fires, webhook runs, steps).
SYSTEM = audit.created_by(None)

# The waiting_for of a new row: its hold, or `queue` when its organization has a full window
# of unclaimed messages on the queue, or executions held back there already. The count stops at
# the window (ix_executions_org_id_queue_unclaimed) and the look for held rows is one probe: an
# execution no limit touches pays a few index entries, not a round trip. `rank` is the row's
# place among those the statement inserts for that organization and queue.
WAITING_FOR_SQL = """CASE
        WHEN %(hold)s::text IS NOT NULL THEN %(hold)s::text
        WHEN %(window)s::int > 0 AND (
            -- Behind executions held back already: first in, first out.
            EXISTS (
                SELECT 1 FROM executions h
                WHERE h.org_id = %(org_id)s AND h.queue = %(queue)s::text
                  AND h.status = 'queued' AND h.waiting_for = 'queue')
            OR {rank} + (
                SELECT count(*) FROM (
                    SELECT 1 FROM executions u
                    WHERE u.org_id = %(org_id)s AND u.queue = %(queue)s::text
                      AND u.status = 'queued' AND u.waiting_for IS NULL
                    LIMIT %(window)s::int) w
            ) > %(window)s::int) THEN 'queue'
    END"""

_INSERT_INTO = """
    INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version, status,
                            priority, input, attempt, max_attempts, queue, waiting_for, flow_key,
                            rate_key, gated, rerun_of, traceparent, created_by_token_id,
                            created_by_token_name, assigned_by)
    SELECT %(id)s, {org_id}, a.id, %(version_id)s, a.name, %(version)s, 'queued', %(priority)s,
           %(input)s, 0, %(max_attempts)s, %(queue)s::text, """
_INSERT_VALUES = (
    WAITING_FOR_SQL.format(rank="1")
    + """,
           %(flow_key)s, %(rate_key)s, %(hold)s::text IS NOT NULL, %(rerun_of)s,
           %(traceparent)s::text, %(created_by_token_id)s, %(created_by_token_name)s::text,
           %(assigned_by)s::jsonb"""
)
_INSERT_SQL = (
    _INSERT_INTO.format(org_id="a.org_id")
    + _INSERT_VALUES
    + """
    FROM agents a
    WHERE a.id = %(agent_id)s AND a.org_id = %(org_id)s AND a.archived_at IS NULL
      AND (%(pinned)s OR a.current_version_id = %(version_id)s)
    RETURNING queued_at, waiting_for
"""
)
# A run through the catalog (app/catalog): the row belongs to the caller's organization, the
# agent to its owner, and it is inserted only while the agent is live and public (or the
# caller's own). The same statement counts another organization's run on the agent (its owner
# sees how often the catalog runs it).
_COUNT_CATALOG_RUN = """a AS (
        UPDATE agents
        SET catalog_runs = catalog_runs + (org_id <> %(org_id)s)::int
        WHERE id = %(agent_id)s AND (visibility = 'public' OR org_id = %(org_id)s)
          AND archived_at IS NULL
          AND (%(pinned)s OR current_version_id = %(version_id)s)
        RETURNING id, name
    )"""
_INSERT_PUBLIC = (
    _INSERT_INTO.format(org_id="%(org_id)s")
    + _INSERT_VALUES
    + """
    FROM a
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
    rerun_of: uuid.UUID | None = None,
    traceparent: str | None = None,
    created_by: dict[str, Any] = SYSTEM,
    audited: audit.Prepared | None = None,
    public: bool = False,
    assigned_by: dict[str, Any] | None = None,
) -> Any:
    """Insert a queued execution; a row of (queued_at, waiting_for), or None when the agent was
    archived or (unless pinned) its current version changed since `spec` was read. `rerun_of`:
    the execution it reruns; `audited`: the audit event the same statement writes. `public`:
    the agent may be another organization's, if it is public (None when it no longer is).
    `assigned_by`: how POST /api/v1/executions chose the agent."""
    if public:
        assert audited is not None, "a run through the catalog is an audited submit"
        statement = _INSERT_PUBLIC_AUDITED_SQL
    else:
        statement = _INSERT_SQL if audited is None else _INSERT_AUDITED_SQL
    with _nul_refused("/input"):
        row = (
            driver(conn)
            .execute(
                statement,
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
                    "rerun_of": rerun_of,
                    "traceparent": traceparent,
                    "assigned_by": None if assigned_by is None else Jsonb(assigned_by),
                    **created_by,
                    **(audited.params if audited else {}),
                },
            )
            .fetchone()
        )
    return row


def _audited(statement: str, columns: str, before: str = "") -> str:
    """`statement` (an INSERT ... RETURNING `columns`) with its audit event written by the same
    statement, only if it inserted: the change and its event commit together, in one round
    trip. `before`: CTEs the statement reads (`name AS (...), `)."""
    return (
        f"WITH {before}inserted AS ({statement}), "
        f"{audit.cte_when('EXISTS (SELECT 1 FROM inserted)')} "
        f"SELECT {columns} FROM inserted"
    )


_INSERT_AUDITED_SQL = _audited(_INSERT_SQL, "queued_at, waiting_for")
# A data-modifying CTE must be at the top level: the count comes first, beside the insert.
_INSERT_PUBLIC_AUDITED_SQL = _audited(
    _INSERT_PUBLIC, "queued_at, waiting_for", before=f"{_COUNT_CATALOG_RUN}, "
)

# A batch: one statement for every item, on the same condition as a single insert, so the batch
# is stored whole or not at all (a stale cache shows up as no rows). Each item takes its place
# in the fair window in item order, and its queued_at is a microsecond after the item's before:
# items of equal priority are let out first in, first out (gates order held rows by age).
_INSERT_BATCH_SQL = (
    """
    INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version, status,
                            priority, input, attempt, max_attempts, queue, waiting_for, flow_key,
                            rate_key, gated, queued_at, rerun_of, traceparent,
                            created_by_token_id, created_by_token_name)
    SELECT r.id, a.org_id, a.id, %(version_id)s, a.name, %(version)s, 'queued', r.priority,
           r.input, 0, %(max_attempts)s, %(queue)s::text, """
    + WAITING_FOR_SQL.format(rank="r.rank")
    + """,
           r.flow_key, r.rate_key, %(hold)s::text IS NOT NULL,
           now() + make_interval(secs => (r.rank - 1) / 1e6), r.rerun_of, %(traceparent)s::text,
           %(created_by_token_id)s, %(created_by_token_name)s::text
    FROM agents a,
         ROWS FROM (json_to_recordset(%(rows)s::json)
                    AS (id uuid, priority smallint, input jsonb, flow_key text, rate_key text,
                        rerun_of uuid))
         WITH ORDINALITY AS r(id, priority, input, flow_key, rate_key, rerun_of, rank)
    WHERE a.id = %(agent_id)s AND a.org_id = %(org_id)s AND a.archived_at IS NULL
      AND (%(pinned)s OR a.current_version_id = %(version_id)s)
    RETURNING id, waiting_for
"""
)
_INSERT_BATCH_AUDITED_SQL = _audited(_INSERT_BATCH_SQL, "id, waiting_for")


@dataclass(frozen=True)
class BatchRow:
    """One execution of a batch: its id, priority and input, and the execution it reruns."""

    id: uuid.UUID
    priority: int
    input: dict[str, Any]
    rerun_of: uuid.UUID | None = None


def insert_batch(
    conn: Connection,
    org_id: uuid.UUID,
    spec: VersionSpec,
    rows: list[BatchRow],
    *,
    pinned: bool,
    entry: Entry = FREE,
    traceparent: str | None = None,
    created_by: dict[str, Any] = SYSTEM,
    audited: audit.Prepared | None = None,
) -> dict[uuid.UUID, str | None] | None:
    """Insert rows as queued executions of `spec`, all or none: id -> waiting_for, or None when
    the agent was archived or (unless pinned) its current version changed since `spec` was
    read."""
    document = json.dumps(
        [
            {
                "id": str(row.id),
                "priority": row.priority,
                "input": row.input,
                "flow_key": spec.flow_key(row.input),
                "rate_key": spec.rate_key(row.input),
                "rerun_of": str(row.rerun_of) if row.rerun_of else None,
            }
            for row in rows
        ]
    )
    with _nul_refused("/items"):
        inserted = (
            driver(conn)
            .execute(
                _INSERT_BATCH_SQL if audited is None else _INSERT_BATCH_AUDITED_SQL,
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
                    "traceparent": traceparent,
                    **created_by,
                    **(audited.params if audited else {}),
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
# their places in their organization's fair window on their queue in document order, and are
# queued a microsecond apart in that order (as a batch's items).
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
                            rate_key, gated, queued_at)
    SELECT r.id, r.org_id, r.agent_id, r.version_id, r.agent_name, r.agent_version, 'queued',
           r.priority, r.input, 0, r.max_attempts, r.queue,
           CASE
               WHEN r.hold IS NOT NULL THEN r.hold
               WHEN r.fair_window > 0 AND (
                   EXISTS (
                       SELECT 1 FROM executions h
                       WHERE h.org_id = r.org_id AND h.queue = r.queue AND h.status = 'queued'
                         AND h.waiting_for = 'queue')
                   OR r.place + (
                       SELECT count(*) FROM (
                           SELECT 1 FROM executions u
                           WHERE u.org_id = r.org_id AND u.queue = r.queue
                             AND u.status = 'queued' AND u.waiting_for IS NULL
                           LIMIT r.fair_window) w
                   ) > r.fair_window) THEN 'queue'
           END,
           r.flow_key, r.rate_key, r.hold IS NOT NULL,
           now() + make_interval(secs => (r.rank - 1) / 1e6)
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
                            queue, waiting_for, flow_key, rate_key, gated, traceparent)
    SELECT %(id)s, ce.org_id, %(agent_id)s, %(version_id)s, %(agent_name)s, %(agent_version)s,
           %(status)s, ce.priority, %(input)s, 0, %(max_attempts)s,
           CASE WHEN %(held)s THEN NULL ELSE now() END, %(error)s,
           CASE WHEN %(refused)s THEN now() END, ce.id, %(step)s, %(stage)s, %(role)s,
           %(queue)s, CASE WHEN %(held)s THEN %(hold)s::text END, %(flow_key)s, %(rate_key)s,
           %(hold)s::text IS NOT NULL, ce.traceparent
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
    # A limit applies: the row is stored held back (app/executions/gates.py).
    hold: str | None = None


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
                "hold": new.hold,
                "held": new.hold is not None and not new.error,
                "flow_key": new.spec.flow_key(new.input),
                "rate_key": new.spec.rate_key(new.input),
            },
        )
        .fetchone()
    )
    return started is not None


# A rerun chain execution's steps before the point it reruns from: copies of the original
# chain execution's step rows, already `succeeded` with the original's output and input,
# attempt 0 (no worker ran them: how the chain execution shows them `reused` and how
# compensation knows to leave them alone, even once retention deleted the original and
# rerun_of reads NULL) and rerun_of naming the row they copy.
_INSERT_REUSED_SQL = """
    INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version, status,
                            priority, input, output, attempt, max_attempts, dispatched_at,
                            started_at, finished_at, chain_execution_id, chain_step, chain_stage,
                            chain_role, queue, rerun_of)
    SELECT r.id, o.org_id, o.agent_id, o.version_id, o.agent_name, o.agent_version, 'succeeded',
           o.priority, o.input, o.output, 0, o.max_attempts, now(), now(), now(),
           %(chain_execution_id)s, o.chain_step, o.chain_stage, 'step', o.queue, o.id
    FROM json_to_recordset(%(rows)s::json) AS r(id uuid, original uuid)
    JOIN executions o ON o.id = r.original AND o.status = 'succeeded' AND o.chain_role = 'step'
"""


def insert_reused_steps(
    conn: Connection, chain_execution_id: uuid.UUID, copies: list[tuple[uuid.UUID, uuid.UUID]]
) -> int:
    """Insert (new id, original step execution id) copies as reused steps of a chain
    execution, in the caller's transaction: how many were inserted."""
    document = json.dumps([{"id": str(new), "original": str(old)} for new, old in copies])
    return (
        driver(conn)
        .execute(_INSERT_REUSED_SQL, {"chain_execution_id": chain_execution_id, "rows": document})
        .rowcount
    )


def stamp_dispatched(conn: Connection, ids: list[uuid.UUID]) -> None:
    conn.execute(
        # Rows a worker claimed meanwhile carry the stamp already: skip the write.
        text(
            "UPDATE executions SET dispatched_at = now() "
            "WHERE id = ANY(:ids) AND dispatched_at IS NULL"
        ),
        {"ids": ids},
    )


# A durable agent's child (ctx.start / ctx.run), inserted only while its parent's attempt still
# runs: a parent whose lease ran out starts nothing. It takes its parent's organization,
# priority, trace context and creator, and sits one level deeper. Held back for a limit like
# any submit (gates), otherwise stamped dispatched: the caller publishes it once committed.
_INSERT_CHILD_SQL = """
    INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version, status,
                            priority, input, attempt, max_attempts, dispatched_at, queue,
                            waiting_for, flow_key, rate_key, gated, traceparent,
                            parent_execution_id, depth, created_by_token_id,
                            created_by_token_name)
    SELECT %(id)s, p.org_id, %(agent_id)s, %(version_id)s, %(agent_name)s, %(agent_version)s,
           'queued', p.priority, %(input)s, 0, %(max_attempts)s,
           CASE WHEN %(hold)s::text IS NULL THEN now() END, %(queue)s, %(hold)s::text,
           %(flow_key)s, %(rate_key)s, %(hold)s::text IS NOT NULL, p.traceparent, p.id,
           p.depth + 1, p.created_by_token_id, p.created_by_token_name
    FROM executions p
    WHERE p.id = %(parent_id)s AND p.attempt = %(attempt)s AND p.status = 'running'
    RETURNING priority
"""


def insert_child(
    conn: Connection,
    execution_id: uuid.UUID,
    parent_id: uuid.UUID,
    parent_attempt: int,
    spec: VersionSpec,
    payload: dict[str, Any],
    hold: str | None,
) -> int | None:
    """Insert a child execution in the caller's transaction: its priority (its parent's), or
    None when the parent's attempt no longer runs (the insert is fenced by it)."""
    with _nul_refused("/input"):
        row = (
            driver(conn)
            .execute(
                _INSERT_CHILD_SQL,
                {
                    "id": execution_id,
                    "parent_id": parent_id,
                    "attempt": parent_attempt,
                    "agent_id": spec.agent_id,
                    "version_id": spec.id,
                    "agent_name": spec.agent_name,
                    "agent_version": spec.version,
                    "input": Jsonb(payload),
                    "max_attempts": spec.max_attempts,
                    "queue": spec.queue,
                    "hold": hold,
                    "flow_key": spec.flow_key(payload),
                    "rate_key": spec.rate_key(payload),
                },
            )
            .fetchone()
        )
    return None if row is None else row[0]
