"""Execution, queue and schedule metrics for /metrics, read from PostgreSQL at scrape time.

Counters and histograms come from the tally's cumulative totals (app/stats/tally.py), so they
are right whatever number of API processes, workers and hosts there are, never count in a
worker's memory, and stay monotonic when retention deletes old executions. Gauges are counted
live with indexed queries. One scrape's answer is kept SCRAPE_CACHE_SECONDS, so Prometheus
servers scraping every API process at once cost the database one round of queries.

Labels: `org` is the organization's name (unique, and what people read on a dashboard); `agent`
is the agent's name for the RUNYARD_METRICS_MAX_AGENTS agents of each organization with the most
executions counted (ties by name), and `other` for the rest, summed. An agent that climbs into
the top N moves its series out of `other`: `other` then drops once, which Prometheus reads as a
counter reset.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Connection, text

from app.config import current_config
from app.db import db
from app.stats import buckets

log = logging.getLogger(__name__)

SCRAPE_CACHE_SECONDS = 1.5
OTHER = "other"
# `le` edges of the exported histograms, as powers of two of a millisecond: 1 ms, 4 ms, 16 ms
# ... 18.6 hours (the stored histograms are finer; these keep the series count small).
DOUBLINGS = tuple(range(0, 27, 2))
# The notifications' events, one per delivery to make (being built alongside this, with status
# pending, delivered or failed): counted when the table exists. Only the final statuses count,
# so the counter only grows (unless the table is pruned).

_TOTALS = text(
    """
    SELECT o.name AS org, a.name AS agent, t.agent_id, t.queue, t.status, t.executions,
           t.durations, t.duration_ms_sum, t.queue_waits, t.queue_wait_ms_sum
    FROM execution_totals t
    JOIN organizations o ON o.id = t.org_id JOIN agents a ON a.id = t.agent_id
    """
)
_SUBMITTED = text(
    """
    SELECT o.name AS org, a.name AS agent, s.agent_id, s.submitted
    FROM submission_totals s
    JOIN organizations o ON o.id = s.org_id JOIN agents a ON a.id = s.agent_id
    """
)
# Queued rows come from the partial index on status = 'queued'; running ones from the lease one.
_QUEUED = text(
    """
    SELECT o.name AS org, coalesce(e.queue, 'default') AS queue, count(*) AS n,
           min(e.queued_at) AS oldest
    FROM executions e JOIN organizations o ON o.id = e.org_id
    WHERE e.status = 'queued' GROUP BY 1, 2
    """
)
_RUNNING = text(
    """
    SELECT o.name AS org, count(*) AS n FROM executions e JOIN organizations o ON o.id = e.org_id
    WHERE e.status = 'running' GROUP BY 1
    """
)
_NOW = text("SELECT now()")
_LAGS = text("SELECT lags, lag_ms_sum FROM schedule_lag_totals WHERE id = 1")
# Counted as deliveries end (app/notifications/delivery.py): a redeliver or retention changing
# the events never takes a count back.
_NOTIFICATIONS = text("SELECT status, events FROM notification_totals ORDER BY status")


def notification_counts(conn: Connection) -> list[tuple[str, int]]:
    """Deliveries that ended, by status (delivered, failed)."""
    return [(status, int(n)) for status, n in conn.execute(_NOTIFICATIONS)]


def bounded_agents(rows: Iterable[tuple[str, Any, str, int]], max_agents: int) -> dict[Any, str]:
    """agent_id -> the label it is reported under, from (org, agent_id, name, count) rows: its
    name for the top `max_agents` of each organization by count, `other` past them."""
    volume: dict[tuple[str, Any, str], int] = defaultdict(int)
    for org, agent_id, name, count in rows:
        volume[(org, agent_id, name)] += int(count)
    by_org: dict[str, list[tuple[int, str, Any]]] = defaultdict(list)
    for (org, agent_id, name), n in volume.items():
        by_org[org].append((-n, name, agent_id))
    labels = {}
    for ranked in by_org.values():
        for rank, (_, name, agent_id) in enumerate(sorted(ranked)):
            labels[agent_id] = name if rank < max_agents else OTHER
    return labels


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _add_histogram(
    family: HistogramMetricFamily, labels: list[str], hist: list[int], sum_ms: float
) -> None:
    cumulative = buckets.cumulative_at(hist, DOUBLINGS)
    edges = [(f"{2.0**k / 1000:g}", n) for k, n in zip(DOUBLINGS, cumulative, strict=True)]
    edges.append(("+Inf", sum(hist)))
    family.add_metric(labels, edges, sum_ms / 1000)


def _execution_metrics(conn: Connection, max_agents: int) -> Iterator[Metric]:
    totals = conn.execute(_TOTALS).all()
    submitted = conn.execute(_SUBMITTED).all()
    volume = [(r.org, r.agent_id, r.agent, r.executions) for r in totals]
    volume += [(r.org, r.agent_id, r.agent, r.submitted) for r in submitted]
    label = bounded_agents(volume, max_agents)

    sub: dict[tuple[str, str], int] = defaultdict(int)
    for r in submitted:
        sub[(r.org, label[r.agent_id])] += int(r.submitted)
    fin: dict[tuple[str, str, str], int] = defaultdict(int)
    dur: dict[tuple[str, str], list[Any]] = {}
    wait: dict[tuple[str, str], list[Any]] = {}
    for r in totals:
        agent = label[r.agent_id]
        fin[(r.org, agent, r.status)] += int(r.executions)
        _accumulate(dur, (r.org, agent), r.durations, r.duration_ms_sum)
        _accumulate(wait, (r.org, r.queue), r.queue_waits, r.queue_wait_ms_sum)

    family = CounterMetricFamily(
        "runyard_executions_submitted", "Executions submitted", labels=["org", "agent"]
    )
    for key, n in sorted(sub.items()):
        family.add_metric(list(key), n)
    yield family
    family = CounterMetricFamily(
        "runyard_executions_finished",
        "Executions that reached a final status",
        labels=["org", "agent", "status"],
    )
    for key, n in sorted(fin.items()):
        family.add_metric(list(key), n)
    yield family
    histogram = _histogram(
        "runyard_execution_duration_seconds", "Started to finished", ["org", "agent"]
    )
    for key, (hist, sum_ms) in sorted(dur.items()):
        _add_histogram(histogram, list(key), hist, sum_ms)
    yield histogram
    histogram = _histogram("runyard_queue_wait_seconds", "Queued to started", ["org", "queue"])
    for key, (hist, sum_ms) in sorted(wait.items()):
        _add_histogram(histogram, list(key), hist, sum_ms)
    yield histogram


def _accumulate(into: dict[Any, list[Any]], key: Any, hist: list[int], sum_ms: float) -> None:
    if key not in into:
        into[key] = [buckets.add([hist]), float(sum_ms)]
    else:
        into[key][0] = buckets.add([into[key][0], hist])
        into[key][1] += float(sum_ms)


def _gauges(conn: Connection) -> Iterator[Metric]:
    now = conn.execute(_NOW).scalar_one()
    queued = GaugeMetricFamily(
        "runyard_executions_queued", "Executions queued now", labels=["org", "queue"]
    )
    oldest: dict[str, Any] = {}
    for row in conn.execute(_QUEUED):
        queued.add_metric([row.org, row.queue], row.n)
        if row.queue not in oldest or row.oldest < oldest[row.queue]:
            oldest[row.queue] = row.oldest
    yield queued
    age = GaugeMetricFamily(
        "runyard_oldest_queued_age_seconds",
        "Age of the oldest queued execution per queue",
        labels=["queue"],
    )
    for queue, at in sorted(oldest.items()):
        age.add_metric([queue], max(0.0, (now - at).total_seconds()))
    yield age
    running = GaugeMetricFamily(
        "runyard_executions_running", "Executions running now", labels=["org"]
    )
    for row in conn.execute(_RUNNING):
        running.add_metric([row.org], row.n)
    yield running


def _schedules_and_notifications(conn: Connection) -> Iterator[Metric]:
    lag = HistogramMetricFamily(
        "runyard_schedule_lag_seconds", "Schedule fire time to the fire actually happening"
    )
    row = conn.execute(_LAGS).first()
    if row is not None:
        _add_histogram(lag, [], list(row.lags), row.lag_ms_sum)
    yield lag
    notifications = CounterMetricFamily(
        "runyard_notifications", "Notification deliveries by status", labels=["status"]
    )
    for status, n in notification_counts(conn):
        notifications.add_metric([status], n)
    yield notifications


class DatabaseCollector(Collector):
    """The PostgreSQL-backed metrics, cached for SCRAPE_CACHE_SECONDS per process."""

    def __init__(self, cache_seconds: float = SCRAPE_CACHE_SECONDS) -> None:
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: list[Metric] = []
        self._at = float("-inf")

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if time.monotonic() - self._at >= self.cache_seconds:
                try:
                    self._cached = self._read()
                except Exception:
                    # The HTTP metrics must still answer with PostgreSQL away: these series
                    # go missing for the scrape (Prometheus's `absent()` shows it).
                    log.exception("metrics: reading PostgreSQL failed")
                    return iter(())
                self._at = time.monotonic()
            return iter(self._cached)

    def _read(self) -> list[Metric]:
        max_agents = current_config().metrics_max_agents
        with db.begin() as conn:
            return [
                *_execution_metrics(conn, max_agents),
                *_gauges(conn),
                *_schedules_and_notifications(conn),
            ]
