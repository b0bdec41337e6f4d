"""The writes of a worker to executions, their attempts and their log lines, and cancels (how
executions enter: app/executions/entries.py; the sweeper's leases: leases.py; the gates of flow
control: gates.py).

The hot steps (claim, finish) are one statement each, run on the driver connection
(`db.driver`). Every write after a claim is fenced by the attempt it claimed: a worker whose
lease ran out cannot overwrite a newer attempt's result.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from app import outbox
from app.db import driver
from app.executions.spec import TERMINAL_STATUSES, Claim, error_body
from app.orgs.services import EXECUTION_TOKEN_PREFIX, hash_token

# ---------------------------------------------------------------------------------------------
# Live events (app/executions/events.py)

EVENTS_CHANNEL = "runyard_events"


def notify_if_watched(row: str = "executions") -> str:
    """An expression for a statement's RETURNING (or a CASE) that tells the open event streams
    of the execution `row` that it changed: a NOTIFY, sent with the commit of the statement that
    made the change, only while a stream watches it (watched_until in the future). For an
    execution nobody watches it costs a comparison with NULL: no round trip, no NOTIFY."""
    return (
        f"CASE WHEN {row}.watched_until > now() "
        f"THEN pg_notify('{EVENTS_CHANNEL}', {row}.id::text) END"
    )


# ---------------------------------------------------------------------------------------------
# Claim, renew, finish (the worker side)


# The claim also makes room in the fair window: the message it took left the broker. When the
# organization holds executions back on the queue, the claim reads its window's size
# (RUNYARD_FAIR_WINDOW times its weight) and its unclaimed messages there; once those are down
# to half the window, a second statement lets out the next held executions (by priority, then
# age) to fill it again, for the worker to publish in one call: half a window's let-outs cost one
# UPDATE and one publish. With nothing held back the claim pays one probe of an empty index
# range (ix_executions_org_id_queue_waiting) and no second statement.
_HOLDING = """
    %(window)s::int > 0 AND EXISTS (
        SELECT 1 FROM executions h
        WHERE h.org_id = executions.org_id AND h.queue = executions.queue
          AND h.status = 'queued' AND h.waiting_for = 'queue')
"""
_CLAIM_SQL = (
    """
    UPDATE executions
    -- A resumed durable execution (`resuming`: it waited for a child, a sleep or an event)
    -- goes on in the attempt that waited: a resume is not a retry, and it started already.
    SET status = 'running', attempt = attempt + CASE WHEN resuming THEN 0 ELSE 1 END,
        started_at = CASE WHEN resuming THEN started_at ELSE now() END, resuming = false,
        worker = %(worker)s, resource_usage = NULL,
        dispatched_at = coalesce(dispatched_at, now()),
        lease_until = now() + make_interval(secs => %(lease)s)
    -- Not written `waiting_for IS NULL`: that matches ix_executions_org_id_queue_unclaimed's
    -- predicate, and with few rows counted the planner scanned that index for the id.
    WHERE id = %(id)s AND status = 'queued' AND (waiting_for IS NULL) IS TRUE
    RETURNING attempt, version_id, input, priority,
              (SELECT coalesce(max(seq), 0) FROM execution_logs WHERE execution_id = %(id)s),
              chain_execution_id, org_id, gated, traceparent, parent_execution_id, resumes,
              queue,
              CASE WHEN """
    + _HOLDING
    + """ THEN (SELECT %(window)s::int * o.weight FROM organizations o
                WHERE o.id = executions.org_id) END,
              CASE WHEN """
    + _HOLDING
    + """ THEN (
                  -- Read before this claim's change: the claimed row counts, hence the - 1.
                  -- Counted up to just past half the window: beyond it nothing is let out.
                  SELECT count(*) - 1 FROM (
                      SELECT 1 FROM executions u
                      WHERE u.org_id = executions.org_id AND u.queue = executions.queue
                        AND u.status = 'queued' AND u.waiting_for IS NULL
                      LIMIT (SELECT %(window)s::int * o.weight / 2 + 2 FROM organizations o
                             WHERE o.id = executions.org_id)) unclaimed) END,
              """
    + notify_if_watched()
)

_LET_OUT_SQL = """
    UPDATE executions SET waiting_for = NULL, dispatched_at = now()
    WHERE id = ANY(ARRAY(
        SELECT id FROM executions
        WHERE org_id = %(org_id)s AND queue = %(queue)s AND status = 'queued'
          AND waiting_for = 'queue'
        ORDER BY priority DESC, queued_at
        LIMIT %(count)s FOR UPDATE SKIP LOCKED))
    RETURNING id, version_id, priority, queued_at
"""


@dataclass(frozen=True)
class LetOut:
    """An execution a claim or a release let out: publish it (it is stamped dispatched)."""

    execution_id: uuid.UUID
    version_id: uuid.UUID
    priority: int


def claim(
    conn: Connection,
    execution_id: uuid.UUID,
    worker: str,
    lease_seconds: float,
    fair_window: int = 0,
) -> tuple[Claim | None, list[LetOut]]:
    """Take a queued execution, and the executions the claim let out of its organization's fair
    window (`fair_window`: RUNYARD_FAIR_WINDOW). A None claim means the message is a duplicate
    or stale: drop it.

    The lease is short (RUNYARD_LEASE_SECONDS) and the worker renews it while the attempt runs
    (`renew_leases`); once it runs out the sweeper takes the execution back."""
    pg = driver(conn)
    row = pg.execute(
        _CLAIM_SQL,
        {"id": execution_id, "worker": worker, "lease": lease_seconds, "window": fair_window},
    ).fetchone()
    if row is None:
        return None, []
    *fields, queue, window_size, unclaimed, _notified = row
    claimed = Claim(execution_id, *fields)
    if window_size is None or unclaimed * 2 > window_size:
        return claimed, []
    params = {"org_id": claimed.org_id, "queue": queue, "count": window_size - unclaimed}
    let_out = pg.execute(_LET_OUT_SQL, params).fetchall()
    let_out.sort(key=lambda out: (-out[2], out[3]))  # published in the order they start
    return claimed, [LetOut(*out[:3]) for out in let_out]


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

# The finished row's notification events are written by the same statement (app/outbox.py):
# an organization without subscriptions pays one probe of an empty index range, no round trip.
_FINISH_SQL = (
    """
    WITH finished AS (
        UPDATE executions
        SET status = %(status)s, output = %(output)s, resource_usage = %(usage)s,
            finished_at = now(), lease_until = NULL,
            -- A cancel that a newer execution asked for (concurrency.on_limit cancel_running)
            -- says so.
            error = CASE WHEN %(cancelled)s AND error ->> 'type' = 'superseded'
                         THEN error ELSE %(error)s END
        WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
        RETURNING id, org_id, agent_id, status, """
    + notify_if_watched()
    + """
    ), notified AS ("""
    + outbox.execution_fanout("finished", "'execution.' || finished.status")
    + """)
    SELECT ARRAY(SELECT id FROM notified) FROM finished
"""
)


@dataclass(frozen=True)
class Finished:
    """What a finish wrote: false when fenced out (a newer attempt owns the row); `events`,
    the notification events it wrote, to publish once committed (outbox.publish)."""

    done: bool
    events: list[uuid.UUID]

    def __bool__(self) -> bool:
        return self.done


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
) -> Finished:
    """Record the outcome, fenced by the attempt: false means a newer attempt owns the row."""
    row = (
        driver(conn)
        .execute(
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
        .fetchone()
    )
    return Finished(False, []) if row is None else Finished(True, row[0])


_RETRY_SQL = text(
    """
    WITH ended AS (
        UPDATE executions
        SET status = 'queued', error = :error, resource_usage = :usage, lease_until = NULL,
            dispatched_at = NULL,
            -- Each attempt is a start: a rate-limited one waits for the window, not a backoff.
            waiting_for = CASE WHEN rate_key IS NOT NULL THEN 'agent_rate_limit' END
        WHERE id = :id AND attempt = :attempt AND status = 'running'
          AND cancel_requested_at IS NULL
        RETURNING id, attempt, error, worker, started_at, resource_usage, """
    + notify_if_watched()
    + """
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
    """Put a failed attempt back in the queue; the caller publishes it with its backoff, unless
    its agent has a rate_limit: then it is held back for the gates (each attempt is a start)."""
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


# One statement per batch, the lines as arrays (a row per line through executemany cost a
# round trip and a plan execution per line: see bench/logs.py), sent in binary (psycopg formats
# a list as text about ten times slower, mostly the timestamps and the messages). The join to
# the execution is the fence of every write after the claim (a stale attempt's lines are
# dropped) and gives each line its organization. A line written twice is skipped by its
# sequence number.
#
# The batch commits without waiting for its WAL to reach the disk (synchronous_commit off for
# this statement's own transaction: it runs in autocommit): that wait was most of a batch's
# time. Nothing it protects is lost: the execution's outcome commits synchronously after its
# last line, which flushes the WAL of every line before it. A PostgreSQL crash (not a clean
# stop) can lose the last fraction of a second of lines of executions still running, as a
# worker crash loses the lines in its buffer.
_LOG_INSERT = (
    """
    INSERT INTO execution_logs (execution_id, seq, attempt, org_id, ts, level, message, fields)
    SELECT e.id, l.seq, e.attempt, e.org_id, l.ts, l.level, l.message, l.fields::jsonb
    FROM executions e,
         unnest(%(seq)b::int[], %(ts)b::timestamptz[], %(level)b::smallint[],
                %(message)b::text[], %(fields)b::text[]) AS l(seq, ts, level, message, fields),
         (SELECT set_config('synchronous_commit', 'off', true)) AS no_wait_for_the_disk
    WHERE e.id = %(execution_id)s AND e.attempt = %(attempt)s
      -- Tells the execution's event streams, if any, once a batch: a condition on `e` alone,
      -- evaluated on its one row (written so that the planner cannot fold the call away).
      AND ("""
    + notify_if_watched("e")
    + """ IS NULL) IS NOT NULL
    ON CONFLICT DO NOTHING
"""
)


@dataclass(frozen=True)
class LogLines:
    """Lines of one attempt, column by column; `fields` holds JSON text or None."""

    execution_id: uuid.UUID
    attempt: int
    seq: list[int]
    ts: list[Any]
    level: list[int]
    message: list[str]
    fields: list[str | None]


def write_logs(conn: Connection, lines: LogLines) -> None:
    if lines.seq:
        driver(conn).execute(_LOG_INSERT, lines.__dict__)


# At most a few per second per execution (workers/progress.py throttles), fenced by the attempt.
_PROGRESS_SQL = """
    UPDATE executions SET progress = %(progress)s
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
    RETURNING """ + notify_if_watched()


def record_progress(
    conn: Connection, execution_id: uuid.UUID, attempt: int, progress: dict[str, Any]
) -> bool:
    """Store an attempt's latest ctx.progress; False when the row is no longer its own."""
    cursor = driver(conn).execute(
        _PROGRESS_SQL, {"id": execution_id, "attempt": attempt, "progress": Jsonb(progress)}
    )
    return cursor.rowcount == 1


# Renewed only past half its span: a watched execution is written once per half span, not
# once per stream or per tick; a finished one is never written.
_WATCH_SQL = """
    UPDATE executions SET watched_until = now() + make_interval(secs => %(seconds)s)
    WHERE id = ANY(%(ids)s) AND status IN ('queued', 'running', 'waiting')
      AND (watched_until IS NULL
           OR watched_until < now() + make_interval(secs => %(seconds)s / 2.0))
"""


def watch(pg: Any, execution_ids: list[uuid.UUID], seconds: float) -> None:
    """Mark executions watched by an event stream for `seconds` (on a psycopg connection, in
    autocommit): the worker's writes to them NOTIFY meanwhile."""
    if execution_ids:
        pg.execute(_WATCH_SQL, {"ids": execution_ids, "seconds": seconds})


_ISSUE_TOKEN = """
    INSERT INTO execution_tokens (execution_id, attempt, token_hash)
    VALUES (%(id)s, %(attempt)s, %(hash)s)
    ON CONFLICT (execution_id) DO UPDATE
    SET attempt = excluded.attempt, token_hash = excluded.token_hash
"""


def issue_execution_token(conn: Connection, claimed: Claim) -> str:
    """A new token for the claimed attempt (a command or http agent's RUNYARD_EXECUTION_TOKEN),
    replacing any earlier attempt's: it answers while this attempt runs (app/orgs/services)."""
    token = EXECUTION_TOKEN_PREFIX + secrets.token_urlsafe(32)
    params = {"id": claimed.execution_id, "attempt": claimed.attempt, "hash": hash_token(token)}
    driver(conn).execute(_ISSUE_TOKEN, params)
    return token


def cancel_requested(conn: Connection, execution_id: uuid.UUID) -> bool:
    return bool(
        conn.execute(
            text("SELECT cancel_requested_at IS NOT NULL FROM executions WHERE id = :id"),
            {"id": execution_id},
        ).scalar()
    )


# ---------------------------------------------------------------------------------------------
# Cancel


# One statement for every unfinished state (a waiting durable execution ends like a queued
# one: no worker holds it): a retry or the sweeper may put a running execution back to
# `queued` at any moment, and two statements (queued, then running) could both miss it and
# answer 409 while the retry goes on. A queued execution ends here; a running one is asked to
# stop (its worker records the end). SET reads the row as it was; RETURNING, as it is now.
_CANCEL = text(
    """
    WITH changed AS (
    UPDATE executions
    SET status = CASE WHEN status IN ('queued', 'waiting') THEN 'cancelled' ELSE status END,
        cancel_requested_at = CASE WHEN status IN ('queued', 'waiting') THEN now()
                                   ELSE coalesce(cancel_requested_at, now()) END,
        finished_at = CASE WHEN status IN ('queued', 'waiting') THEN now() ELSE finished_at END,
        lease_until = CASE WHEN status IN ('queued', 'waiting') THEN NULL ELSE lease_until END,
        error = CASE WHEN status IN ('queued', 'waiting') THEN :error ELSE error END,
        waiting_for = NULL, wake_at = NULL, awaiting = NULL, resuming = false
    WHERE id = :id AND org_id = :org_id AND status IN ('queued', 'running', 'waiting')
    RETURNING id, chain_execution_id, status = 'cancelled' AS ended, gated, org_id, agent_id,
              agent_name, parent_execution_id, """
    + notify_if_watched()
    + """
    ), notified AS ("""
    # A queued execution that ends here has its event (app/outbox.py), delivered by beat's poll.
    + outbox.execution_fanout("changed", "'execution.cancelled'", where="changed.ended")
    + ") SELECT id, chain_execution_id, ended, gated, agent_name, parent_execution_id FROM changed"
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


# ---------------------------------------------------------------------------------------------
# Retention


# One batch of finished executions past their organization's retention (retention_days, else
# the installation's default; 0 keeps them), oldest organizations' rows through
# ix_executions_org_id_finished_at. Their attempts and log lines go with them (ON DELETE
# CASCADE). Chain steps are left to their chain execution (app/chains/retention.py): a step
# deleted on its own would take an output its chain may still read. SKIP LOCKED: a row another
# transaction holds (a late cancel, a rerun reading it) waits for the next run, not the reverse.
_DELETE_EXPIRED = f"""
    DELETE FROM executions WHERE id = ANY(ARRAY(
        SELECT x.id FROM organizations o
        CROSS JOIN LATERAL (
            SELECT e.id FROM executions e
            WHERE e.org_id = o.id AND e.finished_at IS NOT NULL
              AND e.finished_at < now() - make_interval(
                  days => coalesce(o.retention_days, %(days)s))
              AND e.status IN {TERMINAL_STATUSES!r} AND e.chain_execution_id IS NULL
            LIMIT %(batch)s
            FOR UPDATE OF e SKIP LOCKED) x
        WHERE coalesce(o.retention_days, %(days)s) > 0
        LIMIT %(batch)s))
"""


def delete_expired(conn: Connection, default_days: int, batch: int) -> int:
    """Delete up to `batch` expired finished executions; how many went."""
    return driver(conn).execute(_DELETE_EXPIRED, {"days": default_days, "batch": batch}).rowcount
