"""An agent's statistics over a window (GET /api/v1/agents/{ref}/stats).

Finished executions come from the tally's rollups (app/stats/tally.py): per-day rows for the
whole UTC days of the window, per-hour rows for the whole hours around them, per-minute rows for
the partial hours at each end (at most about 170 rows for 7 days, whatever the agent's volume),
plus, read from executions directly, the rows the tally has not reached yet (past the
organization's watermark, normally the last ten seconds or so). Queued and running counts are
live, from executions. The window starts on the minute: `24h` at 10:15:42 counts what finished
from 10:15:00 yesterday.

Percentiles come from log-spaced histograms (app/stats/buckets.py): within 9% of the exact value.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from app.agents import services as agents
from app.orgs.services import Principal
from app.stats import buckets

WINDOWS = {"1h": dt.timedelta(hours=1), "24h": dt.timedelta(hours=24), "7d": dt.timedelta(days=7)}
FINISHED = ("succeeded", "failed", "timed_out", "cancelled")
FAILURES = ("failed", "timed_out")
# Health over the window's executions that ran to an outcome (cancelled ones are someone's
# choice, not the agent's): none -> idle; success rate below FAILING -> failing; below
# DEGRADED -> degraded; else healthy.
FAILING_BELOW = 0.5
DEGRADED_BELOW = 0.95

_NOW = text(
    """
    SELECT now() AS now, w.finished_at AS mark_at, w.finished_id AS mark_id
    FROM (SELECT 1) one LEFT JOIN stats_watermarks w ON w.org_id = :org_id
    """
)
# The rows themselves: adding their arrays up in Python took a third of the time an aggregate
# over them in SQL did (bench/stats.py).
_ROLLED_UP = text(
    """
    SELECT succeeded, failed, timed_out, cancelled, durations, queue_waits, last_failure_id
    FROM agent_stats_rollups
    -- The organization's own runs: another's through the catalog are its own to see.
    WHERE agent_id = :agent_id AND org_id = :org_id AND (
      (span_seconds = 60 AND ((bucket_start >= :start AND bucket_start < :first_hour)
                              OR bucket_start >= :last_hour))
      OR (span_seconds = 3600 AND ((bucket_start >= :first_hour AND bucket_start < :first_day)
                                   OR (bucket_start >= :last_day AND bucket_start < :last_hour)))
      OR (span_seconds = 86400 AND bucket_start >= :first_day AND bucket_start < :last_day))
    """
)
_TAIL = text(
    """
    SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'timed_out') AS timed_out,
           count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
           runyard_hist(runyard_hist_bucket(extract(epoch FROM finished_at - started_at) * 1000))
             AS durations,
           runyard_hist(runyard_hist_bucket(extract(epoch FROM started_at - queued_at) * 1000))
             AS queue_waits,
           (array_agg(id ORDER BY finished_at DESC, id DESC)
              FILTER (WHERE status IN ('failed', 'timed_out')))[1] AS last_failure_id
    FROM executions
    WHERE org_id = :org_id AND agent_id = :agent_id AND finished_at IS NOT NULL
      AND finished_at >= greatest(:start, :mark_at) AND (finished_at, id) > (:mark_at, :mark_id)
      AND status IN ('succeeded', 'failed', 'timed_out', 'cancelled')
      AND NOT (status = 'succeeded' AND attempt = 0)  -- a chain rerun's reused step: not a run
    """
)
_LIVE = text(
    """
    SELECT status, count(*) AS count FROM executions
    WHERE org_id = :org_id AND agent_id = :agent_id AND status IN ('queued', 'running', 'waiting')
    GROUP BY status
    """
)
_FAILURE = text(
    "SELECT id, error, finished_at FROM executions WHERE id = ANY(:ids) AND org_id = :org_id "
    "ORDER BY finished_at DESC, id DESC LIMIT 1"
)


@dataclass
class _Tally:
    counts: dict[str, int]
    durations: list[int]
    queue_waits: list[int]
    failure_ids: list[uuid.UUID]


def _ceil(moment: dt.datetime, unit: dt.timedelta) -> dt.datetime:
    floor = _floor(moment, unit)
    return floor if floor == moment else floor + unit


def _floor(moment: dt.datetime, unit: dt.timedelta) -> dt.datetime:
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return epoch + (moment - epoch) // unit * unit


def spans(now: dt.datetime, window: dt.timedelta) -> dict[str, dt.datetime]:
    """Where the window [start, now] switches between minute, hour and day rollups (UTC):
    minutes in [start, first_hour) and from last_hour on, hours in [first_hour, first_day) and
    [last_day, last_hour), days in [first_day, last_day)."""
    hour, day = dt.timedelta(hours=1), dt.timedelta(days=1)
    start = _floor(now - window, dt.timedelta(minutes=1))
    first_hour, last_hour = _ceil(start, hour), _floor(now, hour)
    first_day, last_day = _ceil(first_hour, day), _floor(last_hour, day)
    if first_day > last_day:  # no whole day inside: hours all along
        first_day = last_day = last_hour
    return {
        "start": start,
        "first_hour": first_hour,
        "first_day": first_day,
        "last_day": last_day,
        "last_hour": last_hour,
    }


def _finished(
    conn: Connection, org_id: uuid.UUID, agent_id: uuid.UUID, window: str, bounds: Any = None
) -> _Tally:
    """`bounds`: the _NOW row, when the caller read it once for several agents."""
    bounds = bounds or conn.execute(_NOW, {"org_id": org_id}).one()
    edges = spans(bounds.now.astimezone(dt.UTC), WINDOWS[window])
    mark_at = bounds.mark_at or dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    mark_id = bounds.mark_id or uuid.UUID(int=0)
    rows = conn.execute(_ROLLED_UP, {"agent_id": agent_id, "org_id": org_id, **edges}).all()
    rows.append(
        conn.execute(
            _TAIL,
            {
                "org_id": org_id,
                "agent_id": agent_id,
                "start": edges["start"],
                "mark_at": mark_at,
                "mark_id": mark_id,
            },
        ).one()
    )
    return _Tally(
        counts={status: sum(int(getattr(row, status) or 0) for row in rows) for status in FINISHED},
        durations=buckets.add(row.durations for row in rows),
        queue_waits=buckets.add(row.queue_waits for row in rows),
        failure_ids=[row.last_failure_id for row in rows if row.last_failure_id is not None],
    )


def _percentiles(histogram: list[int]) -> dict[str, float | None]:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return {
        name: rounded(buckets.percentile(histogram, fraction))
        for name, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
    }


def health(success_rate: float | None) -> str:
    if success_rate is None:
        return "idle"
    if success_rate < FAILING_BELOW:
        return "failing"
    if success_rate < DEGRADED_BELOW:
        return "degraded"
    return "healthy"


def agent_stats(session: Session, principal: Principal, ref: str, window: str) -> dict[str, Any]:
    """The statistics of an agent of the caller's organization (404 otherwise) over `window`."""
    agent = agents.resolve(session, principal, ref)
    conn = session.connection()
    tally = _finished(conn, principal.org_id, agent.id, window)
    counts = tally.counts
    live = dict(
        (row.status, row.count)
        for row in conn.execute(_LIVE, {"org_id": principal.org_id, "agent_id": agent.id})
    )
    counts = {
        "queued": live.get("queued", 0),
        "running": live.get("running", 0),
        "waiting": live.get("waiting", 0),
        **counts,
    }
    outcomes = counts["succeeded"] + sum(counts[status] for status in FAILURES)
    success_rate = round(counts["succeeded"] / outcomes, 4) if outcomes else None
    last_failure = None
    if tally.failure_ids:
        row = conn.execute(_FAILURE, {"ids": tally.failure_ids, "org_id": principal.org_id}).first()
        if row is not None:
            last_failure = {
                "execution_id": row.id,
                "error": row.error,
                "finished_at": row.finished_at,
            }
    return {
        "window": window,
        "counts": counts,
        "success_rate": success_rate,
        "duration_ms": _percentiles(tally.durations),
        "queue_wait_ms": _percentiles(tally.queue_waits),
        "last_failure": last_failure,
        "health": health(success_rate),
    }


def agent_summaries(
    session: Session, principal: Principal, agent_ids: list[uuid.UUID], window: str = "24h"
) -> dict[uuid.UUID, dict[str, Any]]:
    """Health, success rate and p95 duration of each of these agents of the caller's
    organization over `window` (a list page's column: the rollups, not the raw rows)."""
    conn = session.connection()
    bounds = conn.execute(_NOW, {"org_id": principal.org_id}).one()
    summaries = {}
    for agent_id in agent_ids:
        tally = _finished(conn, principal.org_id, agent_id, window, bounds)
        outcomes = tally.counts["succeeded"] + sum(tally.counts[status] for status in FAILURES)
        rate = round(tally.counts["succeeded"] / outcomes, 4) if outcomes else None
        summaries[agent_id] = {
            "health": health(rate),
            "success_rate": rate,
            "p95_ms": _percentiles(tally.durations)["p95"],
        }
    return summaries
