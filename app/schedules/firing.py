"""Firing schedules: what beat (workers/scheduler.py) runs every tick.

Firing is set-based so that thousands of schedules due in the same second cost a handful of
statements per batch of FIRE_BATCH: one SELECT ... FOR UPDATE SKIP LOCKED of the due schedules,
one INSERT of their fire records, one INSERT of the executions, one UPDATE of the schedules, a
commit, then one LPUSH per queue (see fire_due for the threads). The fire record's primary key
(schedule_id, fire_time) and the row lock decide which beat fires a time when several run; the
losers find nothing due or insert nothing.

Which fire times fire, under the catchup and overlap policies, is decided by the planner
(app/schedules/planner.py); this module prepares the runs it asks for and writes its decisions.
The pause_after_failures policy is applied here: each failed execution (failed, timed_out) or
failed fire adds one to consecutive_failures, a success resets it; at the threshold the
schedule pauses itself.

A chain target's fire creates a chain execution instead (schedule_fires.chain_execution_id, and
schedules.last_execution_id names it for the overlap policies: a chain not yet succeeded,
failed or cancelled is still running). Chain runs are built one by one while planning (the
chain services check their steps), and inserted in the batch's transaction after the fire
records, like the agent runs.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from app import outbox, runs
from app.chains import progress
from app.db import db, utcnow
from app.db import driver as db_driver
from app.errors import RunyardError
from app.executions import cancels
from app.executions.spec import TERMINAL_STATUSES
from app.executions.versions import specs
from app.flow import quotas
from app.schedules import cron
from app.schedules.planner import Batch, Planner

FIRE_BATCH = 2000
# Batches written at once: each is a PostgreSQL backend of its own, on its own core.
WRITERS = 2
FAILED_OUTCOMES = ("failed", "timed_out")
TERMINAL = tuple(TERMINAL_STATUSES)


@dataclass
class TickReport:
    fired: int = 0
    skipped: int = 0
    buffered: int = 0
    failed: int = 0
    released: int = 0
    paused: int = 0
    seconds_to_next: float | None = None

    def count(self, status: str) -> None:
        setattr(self, status, getattr(self, status) + 1)


@contextmanager
def _transaction() -> Iterator[Connection]:
    with db.session() as session, session.begin():
        yield session.connection()


class _TimesCache:
    """Fire times are a pure function of (cron, timezone, after): schedules sharing an
    expression, the common case at scale, compute each step once per tick."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, str, dt.datetime], dt.datetime] = {}

    def next_after(self, expression: str, timezone: str, after: dt.datetime) -> dt.datetime:
        key = (expression, timezone, after)
        found = self._next.get(key)
        if found is None:
            found = self._next[key] = cron.next_after(expression, timezone, after)
        return found


_DUE = text(
    """
    SELECT s.id, s.org_id, s.cron, s.timezone, s.input, s.overlap, s.catchup,
           s.catchup_window_seconds, s.next_fire_at, s.agent_id, s.target_kind,
           s.chain_id, s.target_version, s.last_execution_id,
           coalesce(s.version_id, a.current_version_id) AS run_version_id,
           a.archived_at IS NOT NULL AS agent_archived,
           coalesce(e.status, ce.status) AS last_status,
           ce.id IS NOT NULL AS last_is_chain,
           EXISTS (SELECT 1 FROM schedule_fires b
                   WHERE b.schedule_id = s.id AND b.status = 'buffered') AS has_buffered
    FROM schedules s
    LEFT JOIN agents a ON a.id = s.agent_id
    LEFT JOIN executions e ON e.id = s.last_execution_id
    LEFT JOIN chain_executions ce ON ce.id = s.last_execution_id
    WHERE s.enabled AND s.next_fire_at <= :now
    ORDER BY s.next_fire_at
    LIMIT :limit
    FOR UPDATE OF s SKIP LOCKED
    """
)

# Bulk statements take one JSON document each (json_to_recordset): unpacked by PostgreSQL in C,
# far cheaper for 10,000 rows than one bound array per column.
_INSERT_FIRES = """
    INSERT INTO schedule_fires (schedule_id, org_id, fire_time, kind, status, skipped_reason,
                                execution_id, chain_execution_id, outcome, fired_by)
    SELECT r.schedule_id, r.org_id, r.fire_time, r.kind, r.status, r.reason,
           r.execution_id, r.chain_execution_id, r.outcome, %(fired_by)s
    FROM json_to_recordset(%(rows)s::json)
         AS r(schedule_id uuid, org_id uuid, fire_time timestamptz, kind text,
              status text, reason text, execution_id uuid, chain_execution_id uuid,
              outcome text)
    ON CONFLICT (schedule_id, fire_time) DO NOTHING
    RETURNING coalesce(execution_id, chain_execution_id)
"""

_UPDATE_SCHEDULES = """
    UPDATE schedules s
    SET next_fire_at = u.next_fire_at,
        last_fire_at = coalesce(u.last_fire_at, s.last_fire_at),
        last_execution_id = coalesce(u.last_execution_id, s.last_execution_id),
        consecutive_failures = s.consecutive_failures + u.failures
    FROM json_to_recordset(%(rows)s::json)
         AS u(id uuid, next_fire_at timestamptz, last_fire_at timestamptz,
              last_execution_id uuid, failures int)
    WHERE s.id = u.id
"""

_PAUSE_FAILING = text(
    """
    WITH paused AS (
        UPDATE schedules
        SET enabled = false, next_fire_at = NULL,
            paused_reason = 'paused itself after ' || consecutive_failures
                            || ' failed fires in a row'
        WHERE id = ANY(:ids) AND enabled AND pause_after_failures > 0
          AND consecutive_failures >= pause_after_failures
        RETURNING id
    ), dropped AS (
        UPDATE schedule_fires SET status = 'skipped', skipped_reason = 'schedule paused itself'
        WHERE status = 'buffered' AND schedule_id IN (SELECT id FROM paused)
    )
    SELECT id FROM paused
    """
)


class _Planner(Planner):
    """The planner of one batch, with the schedules' targets: each run it fires is checked and
    built on the batch's connection."""

    def __init__(self, conn: Connection, now: dt.datetime, fired_by: str, rows: list[Any]) -> None:
        # max_queued and cpu_seconds_per_day of the batch's organizations, read once each.
        room = quotas.Room(conn, (row.org_id for row in rows))
        super().__init__(now, _TimesCache().next_after, TERMINAL, room)
        self.conn = conn
        self.fired_by = fired_by
        self._validity: dict[tuple[uuid.UUID, uuid.UUID], str | None] = {}

    def prepare(self, row: Any, run_id: uuid.UUID) -> str | None:
        """Add the run to the batch's launches; or why the target cannot run this schedule's
        input now."""
        if row.chain_id is not None:
            try:
                self.batch.launches[run_id] = runs.chain_launch(
                    self.conn, row.org_id, row.chain_id, row.target_version, row.input, run_id
                )
            except RunyardError as exc:
                return f"the chain cannot run: {exc.message}"
            return None
        reason = self.refusal(row)
        if reason is None:
            spec = specs.get(self.conn, row.run_version_id)
            self.batch.launches[run_id] = runs.Launch(run_id, row.org_id, spec, row.input)
        return reason

    def refusal(self, row: Any) -> str | None:
        """Why the agent target cannot run this schedule's input now, or None."""
        if row.agent_archived:
            return "the agent is archived"
        key = (row.id, row.run_version_id)
        if key not in self._validity:
            spec = specs.get(self.conn, row.run_version_id)
            errors = spec.input_errors(row.input)
            self._validity[key] = (
                f"the input no longer matches the agent's input_schema ({errors})"
                if errors
                else None
            )
        return self._validity[key]


def _write(conn: Connection, planner: _Planner) -> runs.Launched:
    batch = planner.batch
    if not batch.fires and not batch.updates:
        return runs.Launched()
    driver = db_driver(conn)
    inserted = {
        row[0]
        for row in driver.execute(
            _INSERT_FIRES,
            {"rows": json.dumps(batch.fires, default=str), "fired_by": planner.fired_by},
        ).fetchall()
        if row[0] is not None
    }
    # A fire time another beat recorded first inserts nothing here: its execution is not made.
    launched = runs.launch(
        conn,
        [launch for eid, launch in batch.launches.items() if eid in inserted],
        on_limit=False,
    )
    for new_id, (org_id, previous, is_chain) in batch.cancels.items():
        if new_id in inserted:
            message = f"cancelled by schedule overlap policy cancel_other: {new_id} replaces it"
            if is_chain:
                progress.request_cancel(conn, org_id, previous, message)
            else:
                cancels.request_cancel(conn, org_id, [previous], message)
    updates = batch.updates
    for update in updates:
        if update["last_execution_id"] not in inserted:
            update["last_execution_id"] = None
    driver.execute(_UPDATE_SCHEDULES, {"rows": json.dumps(updates, default=str)})
    failing = [u["id"] for u in updates if u["failures"]]
    if failing:
        conn.execute(_PAUSE_FAILING, {"ids": failing})
    return launched


def _write_and_publish(session: Session, planner: _Planner) -> tuple[Batch, list[uuid.UUID]]:
    """Write a planned batch, commit, then publish it (the writer thread of fire_due)."""
    try:
        launched = _write(session.connection(), planner)
        session.commit()
    finally:
        session.close()  # rolls back what was not committed
    return planner.batch, runs.publish_unstamped(launched)


def fire_due(now: dt.datetime, fired_by: str, report: TickReport) -> None:
    """Fire every schedule due at `now`, FIRE_BATCH at a time, each batch one transaction
    published only after its own commit.

    This thread locks and plans a batch, then hands its open transaction to one of WRITERS
    threads, which writes, commits and publishes it while this thread plans the next (SKIP
    LOCKED passes over the rows still locked by batches being written); dispatched_at is
    stamped once at the end. Planning is Python work; writing is mostly PostgreSQL's, in a
    backend per writer, and waiting on it releases the interpreter lock, so the two overlap
    (bench/schedules.py: 2.7 s for 10,000 written in this thread, 1.6 s with two writers).
    Two threads each planning and writing measured slower: planning contends for the lock."""
    with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="schedule-write") as writer:
        pending = []
        try:
            while True:
                session = db.session()
                try:
                    session.begin()
                    conn = session.connection()
                    rows = conn.execute(_DUE, {"now": now, "limit": FIRE_BATCH}).all()
                    planner = _Planner(conn, now, fired_by, rows)
                    for row in rows:
                        planner.plan(row)
                except BaseException:
                    session.close()
                    raise
                if not rows:
                    session.close()
                    break
                pending.append(writer.submit(_write_and_publish, session, planner))
                if len(rows) < FIRE_BATCH:
                    break
        finally:
            published: list[uuid.UUID] = []
            failure: BaseException | None = None
            for done in pending:
                # Every batch that went out is counted and stamped, even when another failed:
                # an unstamped one would be sent again by the sweeper.
                try:
                    batch, sent = done.result()
                except BaseException as exc:
                    failure = failure or exc
                    continue
                published.extend(sent)
                for fire in batch.fires:
                    report.count(fire["status"])
            # Once for the whole tick: each batch's publishing need not wait on the previous
            # one's stamps. Until stamped, a row is only at risk of a second, harmless message
            # from the sweeper (a duplicate finds nothing to claim).
            runs.stamp(published)
            if failure is not None:
                raise failure


_BUFFERED_READY = text(
    f"""
    SELECT f.fire_time, s.id, s.org_id, s.input, s.target_kind, s.chain_id, s.target_version,
           coalesce(s.version_id, a.current_version_id) AS run_version_id,
           a.archived_at IS NOT NULL AS agent_archived
    FROM schedule_fires f
    JOIN schedules s ON s.id = f.schedule_id
    LEFT JOIN agents a ON a.id = s.agent_id
    LEFT JOIN executions e ON e.id = s.last_execution_id
    LEFT JOIN chain_executions ce ON ce.id = s.last_execution_id
    WHERE f.status = 'buffered' AND s.enabled
      AND coalesce(e.status, ce.status, 'succeeded') IN {TERMINAL!r}
    FOR UPDATE OF f, s SKIP LOCKED
    """
)

_RELEASE = text(
    """
    UPDATE schedule_fires
    SET status = :status, execution_id = :execution_id,
        chain_execution_id = :chain_execution_id, skipped_reason = :reason,
        outcome = :outcome, fired_at = now(), fired_by = :fired_by
    WHERE schedule_id = :schedule_id AND fire_time = :fire_time AND status = 'buffered'
    """
)

_LAST_EXECUTION = text(
    "UPDATE schedules SET last_execution_id = :execution_id, "
    "consecutive_failures = consecutive_failures + :failures WHERE id = :id"
)


def release_buffered(fired_by: str, report: TickReport) -> None:
    """Run the buffered fires (overlap buffer_one) whose blocking execution has finished."""
    with _transaction() as conn:
        rows = conn.execute(_BUFFERED_READY).all()
        if not rows:
            return
        planner = _Planner(conn, utcnow(), fired_by, rows)
        for row in rows:
            run_id = uuid.uuid4()
            # A quota's refusal is a skip, not a failure of the schedule.
            skipped = planner.quota_refusal(row)
            failed = None if skipped else planner.prepare(row, run_id)
            execution_id = None if skipped or failed else run_id
            if execution_id is not None:
                planner.room.take(row.org_id)
            chain = row.chain_id is not None
            conn.execute(
                _RELEASE,
                {
                    "schedule_id": row.id,
                    "fire_time": row.fire_time,
                    "status": "skipped" if skipped else "failed" if failed else "fired",
                    "execution_id": None if chain else execution_id,
                    "chain_execution_id": execution_id if chain else None,
                    "reason": skipped or failed,
                    "outcome": "failed" if failed else None,
                    "fired_by": fired_by,
                },
            )
            conn.execute(
                _LAST_EXECUTION,
                {"id": row.id, "execution_id": execution_id, "failures": 1 if failed else 0},
            )
            report.released += 1
        launched = runs.launch(conn, list(planner.batch.launches.values()), on_limit=False)
        conn.execute(_PAUSE_FAILING, {"ids": [row.id for row in rows]})
    runs.publish(launched)


_SETTLE = text(
    f"""
    WITH settled AS (
        SELECT f.schedule_id, f.fire_time, coalesce(e.status, ce.status) AS status
        FROM schedule_fires f
        JOIN schedules s ON s.id = f.schedule_id
        LEFT JOIN executions e ON e.id = f.execution_id
        LEFT JOIN chain_executions ce ON ce.id = f.chain_execution_id
        WHERE s.pause_after_failures > 0 AND s.enabled
          AND f.status = 'fired' AND f.outcome IS NULL
          AND coalesce(e.status, ce.status) IN {TERMINAL!r}
    )
    UPDATE schedule_fires f SET outcome = settled.status
    FROM settled
    WHERE f.schedule_id = settled.schedule_id AND f.fire_time = settled.fire_time
    RETURNING f.schedule_id, f.fire_time, settled.status
    """
)

_COUNT_FAILURES = text(
    """
    UPDATE schedules
    SET consecutive_failures = CASE WHEN :reset THEN 0 ELSE consecutive_failures END + :failures
    WHERE id = :id
    """
)


def settle_outcomes(report: TickReport) -> None:
    """Count the finished executions of schedules that pause after failures; pause those that
    reached their threshold."""
    with _transaction() as conn:
        rows = conn.execute(_SETTLE).all()
        if not rows:
            return
        outcomes: dict[uuid.UUID, list[tuple[dt.datetime, str]]] = {}
        for schedule_id, fire_time, status in rows:
            outcomes.setdefault(schedule_id, []).append((fire_time, status))
        for schedule_id, settled in outcomes.items():
            settled.sort()
            successes = [i for i, (_, status) in enumerate(settled) if status == "succeeded"]
            tail = settled[successes[-1] + 1 :] if successes else settled
            failures = sum(1 for _, status in tail if status in FAILED_OUTCOMES)
            conn.execute(
                _COUNT_FAILURES,
                {"id": schedule_id, "reset": bool(successes), "failures": failures},
            )
        paused = conn.execute(_PAUSE_FAILING, {"ids": list(outcomes)}).scalars().all()
        report.paused += len(paused)
        # Their schedule.paused events, in this transaction (delivered by beat's poll).
        outbox.schedules_paused(conn, paused)


_NEXT_DUE = text("SELECT min(next_fire_at) FROM schedules WHERE enabled")


def tick(fired_by: str, now: dt.datetime | None = None) -> TickReport:
    """One beat tick: release buffered fires, count outcomes, fire what is due."""
    report = TickReport()
    release_buffered(fired_by, report)
    settle_outcomes(report)
    fire_due(now or utcnow(), fired_by, report)
    with db.hot() as conn:
        next_due = conn.execute(_NEXT_DUE).scalar()
    if next_due is not None:
        report.seconds_to_next = max(0.0, (next_due - utcnow()).total_seconds())
    return report
