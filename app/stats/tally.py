"""The statistics tally, run by beat (workers/maintenance.py): counts executions that finished
since the last tally into per-minute and per-hour rollups (GET /agents/{ref}/stats) and into
cumulative totals (/metrics), counts submits into submission totals, and schedule fires into the
schedule-lag histogram.

Nothing of this runs on an execution's path: the finish statement stays as it was, and the
tally reads executions through the (org_id, finished_at) and (org_id, queued_at) indexes that
exist already. Each organization has a watermark per kind, (finished_at, id) and (queued_at, id);
a batch takes the rows past it in that order, adds them up in one statement and moves the
watermark, in one transaction that holds the watermark's row lock (two beats never count a row
twice). Rows newer than LAG_SECONDS are left for the next round: finished_at is the finishing
transaction's start, and a transaction still open when the tally passes its time would commit
a row behind the watermark, never to be counted. What the tally has not reached yet, the stats
query reads from executions directly.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import Connection, text

from app.db import db
from app.stats import buckets

LAG_SECONDS = 10.0
# A batch's statement stays well inside the statement timeout (8 s) on a busy server.
BATCH = 10_000
# Rollups older than the longest stats window (7d) and an hour to spare are of no use.
KEEP_ROLLUPS = "8 days"

_ENSURE = text(
    "INSERT INTO stats_watermarks (org_id) SELECT id FROM organizations ON CONFLICT DO NOTHING"
)
_ORGS = text("SELECT org_id FROM stats_watermarks ORDER BY org_id")
_LOCK = text(
    "SELECT finished_at, finished_id, queued_at, queued_id FROM stats_watermarks "
    "WHERE org_id = :org_id FOR UPDATE"
)

# One batch of finished executions past the watermark, added to the minute and hour rollups and
# to the totals in one statement; answers the batch's last (finished_at, id) and its size.
_FINISHED = text(
    """
    WITH batch AS (
      SELECT id, agent_id, coalesce(queue, 'default') AS queue, status, finished_at,
             extract(epoch FROM finished_at - started_at) * 1000 AS duration_ms,
             extract(epoch FROM started_at - queued_at) * 1000 AS wait_ms
      FROM executions
      WHERE org_id = :org_id AND finished_at IS NOT NULL AND finished_at >= :after_at
        AND (finished_at, id) > (:after_at, :after_id) AND finished_at < :cutoff
        AND status IN ('succeeded', 'failed', 'timed_out', 'cancelled')
        -- Not a chain rerun's reused step: a copy no worker ran (succeeded at attempt 0).
        AND NOT (status = 'succeeded' AND attempt = 0)
      ORDER BY finished_at, id
      LIMIT :batch
    ),
    spans AS (
      SELECT 60 AS span_seconds, date_trunc('minute', finished_at, 'UTC') AS bucket_start, *
      FROM batch
      UNION ALL SELECT 3600, date_trunc('hour', finished_at, 'UTC'), * FROM batch
      UNION ALL SELECT 86400, date_trunc('day', finished_at, 'UTC'), * FROM batch
    ),
    rollups AS (
      INSERT INTO agent_stats_rollups AS r (agent_id, span_seconds, bucket_start, org_id,
        succeeded, failed, timed_out, cancelled, durations, queue_waits, last_failure_id,
        last_failure_at)
      SELECT agent_id, span_seconds, bucket_start, :org_id,
             count(*) FILTER (WHERE status = 'succeeded'),
             count(*) FILTER (WHERE status = 'failed'),
             count(*) FILTER (WHERE status = 'timed_out'),
             count(*) FILTER (WHERE status = 'cancelled'),
             runyard_hist(runyard_hist_bucket(duration_ms)),
             runyard_hist(runyard_hist_bucket(wait_ms)),
             (array_agg(id ORDER BY finished_at DESC, id DESC)
                FILTER (WHERE status IN ('failed', 'timed_out')))[1],
             max(finished_at) FILTER (WHERE status IN ('failed', 'timed_out'))
      FROM spans GROUP BY agent_id, span_seconds, bucket_start
      ON CONFLICT (agent_id, span_seconds, bucket_start, org_id) DO UPDATE SET
        succeeded = r.succeeded + excluded.succeeded,
        failed = r.failed + excluded.failed,
        timed_out = r.timed_out + excluded.timed_out,
        cancelled = r.cancelled + excluded.cancelled,
        durations = runyard_hist_merge(r.durations, excluded.durations),
        queue_waits = runyard_hist_merge(r.queue_waits, excluded.queue_waits),
        last_failure_id = CASE WHEN excluded.last_failure_at >= r.last_failure_at
          OR r.last_failure_at IS NULL THEN excluded.last_failure_id ELSE r.last_failure_id END,
        last_failure_at = greatest(r.last_failure_at, excluded.last_failure_at)
    ),
    totals AS (
      INSERT INTO execution_totals AS t (agent_id, queue, status, org_id, executions, durations,
        duration_ms_sum, queue_waits, queue_wait_ms_sum)
      SELECT agent_id, queue, status, :org_id, count(*),
             runyard_hist(runyard_hist_bucket(duration_ms)), coalesce(sum(duration_ms), 0),
             runyard_hist(runyard_hist_bucket(wait_ms)), coalesce(sum(wait_ms), 0)
      FROM batch GROUP BY agent_id, queue, status
      ON CONFLICT (agent_id, queue, status, org_id) DO UPDATE SET
        executions = t.executions + excluded.executions,
        durations = runyard_hist_merge(t.durations, excluded.durations),
        duration_ms_sum = t.duration_ms_sum + excluded.duration_ms_sum,
        queue_waits = runyard_hist_merge(t.queue_waits, excluded.queue_waits),
        queue_wait_ms_sum = t.queue_wait_ms_sum + excluded.queue_wait_ms_sum
    )
    SELECT finished_at, id, (SELECT count(*) FROM batch) AS n
    FROM batch ORDER BY finished_at DESC, id DESC LIMIT 1
    """
)
_MOVE_FINISHED = text(
    "UPDATE stats_watermarks SET finished_at = :at, finished_id = :id WHERE org_id = :org_id"
)

_SUBMITTED = text(
    """
    WITH batch AS (
      SELECT id, agent_id, queued_at FROM executions
      WHERE org_id = :org_id AND queued_at >= :after_at AND (queued_at, id) > (:after_at, :after_id)
        AND queued_at < :cutoff
        AND NOT (status = 'succeeded' AND attempt = 0)  -- a chain rerun's reused step
      ORDER BY queued_at, id
      LIMIT :batch
    ),
    counted AS (
      INSERT INTO submission_totals AS s (agent_id, org_id, submitted)
      SELECT agent_id, :org_id, count(*) FROM batch GROUP BY agent_id
      ON CONFLICT (agent_id, org_id) DO UPDATE SET submitted = s.submitted + excluded.submitted
    )
    SELECT queued_at, id, (SELECT count(*) FROM batch) AS n
    FROM batch ORDER BY queued_at DESC, id DESC LIMIT 1
    """
)
_MOVE_QUEUED = text(
    "UPDATE stats_watermarks SET queued_at = :at, queued_id = :id WHERE org_id = :org_id"
)

_LAG_ROW = text(
    """
    INSERT INTO schedule_lag_totals (id, fired_at, schedule_id, fire_time, lags, lag_ms_sum)
    VALUES (1, 'epoch', :zero, 'epoch', array_fill(0::bigint, ARRAY[:buckets]), 0)
    ON CONFLICT DO NOTHING
    """
)
_FIRES = text(
    """
    WITH mark AS (
      SELECT fired_at, schedule_id, fire_time FROM schedule_lag_totals WHERE id = 1 FOR UPDATE
    ),
    batch AS (
      SELECT f.fired_at, f.schedule_id, f.fire_time,
             greatest(extract(epoch FROM f.fired_at - f.fire_time) * 1000, 0) AS lag_ms
      FROM schedule_fires f, mark
      WHERE f.fired_at >= mark.fired_at
        AND (f.fired_at, f.schedule_id, f.fire_time)
          > (mark.fired_at, mark.schedule_id, mark.fire_time)
        AND f.fired_at < :cutoff
      ORDER BY f.fired_at, f.schedule_id, f.fire_time
      LIMIT :batch
    ),
    last AS (
      SELECT * FROM batch ORDER BY fired_at DESC, schedule_id DESC, fire_time DESC LIMIT 1
    )
    UPDATE schedule_lag_totals t SET
      fired_at = last.fired_at, schedule_id = last.schedule_id, fire_time = last.fire_time,
      lags = runyard_hist_merge(t.lags,
        (SELECT runyard_hist(runyard_hist_bucket(lag_ms)) FROM batch)),
      lag_ms_sum = t.lag_ms_sum + (SELECT sum(lag_ms) FROM batch)
    FROM last WHERE t.id = 1
    RETURNING (SELECT count(*) FROM batch)
    """
)
_PRUNE = text(
    f"DELETE FROM agent_stats_rollups WHERE bucket_start < now() - interval '{KEEP_ROLLUPS}'"
)


@dataclass
class TallyReport:
    finished: int = 0
    submitted: int = 0
    fires: int = 0
    caught_up: bool = True


def _cutoff(conn: Connection, lag_seconds: float) -> dt.datetime:
    # clock_timestamp, not now(): a long transaction (a test's) must not freeze the cutoff.
    return conn.execute(
        text("SELECT clock_timestamp() - make_interval(secs => :lag)"), {"lag": lag_seconds}
    ).scalar_one()


def _tally_org(org_id: uuid.UUID, lag_seconds: float, batch: int) -> tuple[int, int, bool]:
    """One batch of each kind for one organization; whether it has caught up."""
    with db.begin() as conn:
        mark = conn.execute(_LOCK, {"org_id": org_id}).one()
        cutoff = _cutoff(conn, lag_seconds)
        common = {"org_id": org_id, "cutoff": cutoff, "batch": batch}
        done = conn.execute(
            _FINISHED, {**common, "after_at": mark.finished_at, "after_id": mark.finished_id}
        ).first()
        if done is not None:
            conn.execute(_MOVE_FINISHED, {"org_id": org_id, "at": done.finished_at, "id": done.id})
        queued = conn.execute(
            _SUBMITTED, {**common, "after_at": mark.queued_at, "after_id": mark.queued_id}
        ).first()
        if queued is not None:
            conn.execute(_MOVE_QUEUED, {"org_id": org_id, "at": queued.queued_at, "id": queued.id})
    finished = done.n if done is not None else 0
    submitted = queued.n if queued is not None else 0
    return finished, submitted, finished < batch and submitted < batch


def _tally_fires(lag_seconds: float, batch: int) -> int:
    with db.begin() as conn:
        conn.execute(_LAG_ROW, {"zero": uuid.UUID(int=0), "buckets": buckets.BUCKETS})
        cutoff = _cutoff(conn, lag_seconds)
        return conn.execute(_FIRES, {"cutoff": cutoff, "batch": batch}).scalar() or 0


def tally(
    budget_seconds: float = 2.0, *, lag_seconds: float = LAG_SECONDS, batch: int = BATCH
) -> TallyReport:
    """Count what finished, was submitted or fired since the last tally, a batch at a time per
    organization, until caught up or `budget_seconds` have passed (the rest waits a round)."""
    report = TallyReport()
    deadline = time.monotonic() + budget_seconds
    with db.begin() as conn:
        conn.execute(_ENSURE)
        orgs = list(conn.execute(_ORGS).scalars())
    pending = orgs
    while pending:
        still = []
        for org_id in pending:
            finished, submitted, caught_up = _tally_org(org_id, lag_seconds, batch)
            report.finished += finished
            report.submitted += submitted
            if not caught_up:
                still.append(org_id)
        pending = still
        if pending and time.monotonic() >= deadline:
            report.caught_up = False
            break
    report.fires = _tally_fires(lag_seconds, batch)
    return report


def prune() -> int:
    """Delete rollups past the longest stats window."""
    with db.begin() as conn:
        return conn.execute(_PRUNE).rowcount
