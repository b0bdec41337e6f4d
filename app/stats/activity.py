"""An organization's finished executions per minute over the last hour and per hour over the
last day, with their failures (the console's overview).

Read from the tally's rollups (app/stats/tally.py: per-minute and per-hour rows of every agent,
found through their bucket_start index), plus the executions the tally has not reached yet (past
the organization's watermark, normally the last ten seconds or so, through the
(org_id, finished_at) index). What it costs depends on the number of agents and buckets, not on
the number of executions.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.orgs.services import Principal
from app.stats.services import FAILURES

MINUTE, HOUR = dt.timedelta(minutes=1), dt.timedelta(hours=1)
# name -> (bucket width, buckets shown): the last hour by minute, the last day by hour.
SERIES = {"1h": (MINUTE, 60), "24h": (HOUR, 24)}

_NOW = text(
    """
    SELECT now() AS now, w.finished_at AS mark_at, w.finished_id AS mark_id
    FROM (SELECT 1) one LEFT JOIN stats_watermarks w ON w.org_id = :org_id
    """
)
_ROLLED_UP = text(
    """
    SELECT bucket_start, sum(succeeded + failed + timed_out + cancelled) AS finished,
           sum(failed + timed_out) AS failures
    FROM agent_stats_rollups
    WHERE org_id = :org_id AND span_seconds = :span AND bucket_start >= :start
    GROUP BY bucket_start
    """
)
_TAIL = text(
    """
    SELECT date_trunc(:unit, finished_at, 'UTC') AS bucket_start, count(*) AS finished,
           count(*) FILTER (WHERE status IN ('failed', 'timed_out')) AS failures
    FROM executions
    WHERE org_id = :org_id AND finished_at IS NOT NULL
      AND finished_at >= greatest(:start, :mark_at) AND (finished_at, id) > (:mark_at, :mark_id)
      AND status IN ('succeeded', 'failed', 'timed_out', 'cancelled')
      AND NOT (status = 'succeeded' AND attempt = 0)  -- a chain rerun's reused step: not a run
    GROUP BY 1
    """
)

assert FAILURES == ("failed", "timed_out")  # as _ROLLED_UP and _TAIL count them


def _floor(moment: dt.datetime, unit: dt.timedelta) -> dt.datetime:
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return epoch + (moment - epoch) // unit * unit


@dataclass(frozen=True)
class Bucket:
    start: dt.datetime
    finished: int
    failures: int

    @property
    def failure_rate(self) -> float | None:
        return self.failures / self.finished if self.finished else None


def series(session: Session, principal: Principal, name: str) -> list[Bucket]:
    """Every bucket of the series `name` (see SERIES), oldest first, the current one last."""
    principal.require("read")
    width, count = SERIES[name]
    conn = session.connection()
    bounds = conn.execute(_NOW, {"org_id": principal.org_id}).one()
    now = bounds.now.astimezone(dt.UTC)
    start = _floor(now, width) - width * (count - 1)
    totals: dict[dt.datetime, list[int]] = {start + width * i: [0, 0] for i in range(count)}
    params = {"org_id": principal.org_id, "start": start}
    rolled = conn.execute(_ROLLED_UP, {**params, "span": int(width.total_seconds())})
    tail = conn.execute(
        _TAIL,
        {
            **params,
            "unit": "minute" if width == MINUTE else "hour",
            "mark_at": bounds.mark_at or dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
            "mark_id": bounds.mark_id or uuid.UUID(int=0),
        },
    )
    for row in [*rolled, *tail]:
        slot = totals.get(row.bucket_start.astimezone(dt.UTC))
        if slot is not None:
            slot[0] += int(row.finished)
            slot[1] += int(row.failures)
    return [Bucket(at, finished, failures) for at, (finished, failures) in totals.items()]
