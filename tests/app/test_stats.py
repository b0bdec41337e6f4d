"""GET /api/v1/agents/{ref}/stats: counts, success rate, percentiles from the tally's rollups
plus the rows it has not reached, last failure, health; the tally's own bookkeeping."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import text

from app.stats import buckets, services, tally
from tests.app.test_executions_api import make_agent, submit

_INSERT = text(
    """
    INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version, status,
                            input, attempt, queue, error, queued_at, started_at, finished_at)
    SELECT :id, a.org_id, a.id, a.current_version_id, a.name, a.current_version, :status,
           '{}', 1, 'default', CAST(:error AS jsonb),
           now() - make_interval(secs => :ago + :duration + :wait),
           now() - make_interval(secs => :ago + :duration),
           now() - make_interval(secs => :ago)
    FROM agents a WHERE a.id = :agent_id
    """
)


def add(connection, agent, status="succeeded", duration_ms=10.0, wait_ms=5.0, ago=60.0, error=None):
    """A finished execution of `agent`, finished `ago` seconds before now()."""
    execution_id = uuid.uuid4()
    connection.execute(
        _INSERT,
        {
            "id": execution_id,
            "agent_id": agent["id"],
            "status": status,
            "error": None if error is None else f'{{"type": "{error}", "message": "{error}!"}}',
            "ago": ago,
            "duration": duration_ms / 1000,
            "wait": wait_ms / 1000,
        },
    )
    return execution_id


def stats(client, org, window="24h", agent="echo"):
    response = client.get(f"/api/v1/agents/{agent}/stats?window={window}", headers=org.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def exact(connection, agent, column, fraction):
    """The exact percentile PostgreSQL computes over the raw rows, in ms."""
    expression = {
        "duration": "finished_at - started_at",
        "wait": "started_at - queued_at",
    }[column]
    return connection.execute(
        text(
            f"SELECT percentile_cont(:f) WITHIN GROUP (ORDER BY extract(epoch FROM {expression}) "
            "* 1000) FROM executions WHERE agent_id = :agent AND finished_at IS NOT NULL"
        ),
        {"f": fraction, "agent": agent["id"]},
    ).scalar_one()


def test_counts_percentiles_and_last_failure_from_rollups_and_tail(client, org, connection):
    agent = make_agent(client, org)
    for i in range(1, 101):
        add(connection, agent, duration_ms=10.0 * i, wait_ms=2.0 * i, ago=600 + i)
    add(connection, agent, "failed", duration_ms=50, ago=900, error="runtime_error")
    add(connection, agent, "cancelled", duration_ms=5, ago=300)
    report = tally.tally(lag_seconds=0)
    assert report.finished >= 102 and report.caught_up
    # Past the watermark: read live from executions, added to what the rollups hold.
    latest = add(connection, agent, "timed_out", duration_ms=3000, ago=1, error="timeout")
    assert submit(client, org).status_code == 202

    body = stats(client, org)
    assert body["window"] == "24h"
    assert body["counts"] == {
        "queued": 1,
        "running": 0,
        "waiting": 0,
        "succeeded": 100,
        "failed": 1,
        "timed_out": 1,
        "cancelled": 1,
    }
    assert body["success_rate"] == round(100 / 102, 4)
    assert body["health"] == "healthy"
    for name, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        want = exact(connection, agent, "duration", fraction)
        assert abs(body["duration_ms"][name] - want) <= 0.1 * want, (name, body, want)
        want = exact(connection, agent, "wait", fraction)
        assert abs(body["queue_wait_ms"][name] - want) <= 0.1 * want, (name, body, want)
    assert body["last_failure"]["execution_id"] == str(latest)
    assert body["last_failure"]["error"]["type"] == "timeout"


def test_last_failure_from_the_rollups(client, org, connection):
    agent = make_agent(client, org)
    older = add(connection, agent, "failed", ago=4000, error="runtime_error")
    newer = add(connection, agent, "failed", ago=3000, error="output_invalid")
    add(connection, agent, "succeeded", ago=10)
    tally.tally(lag_seconds=0)
    body = stats(client, org)
    assert body["last_failure"]["execution_id"] == str(newer) != str(older)
    assert body["last_failure"]["error"]["type"] == "output_invalid"
    assert body["health"] == "failing"  # 1 of 3


def test_windows_count_what_finished_inside_them(client, org, connection):
    agent = make_agent(client, org)
    add(connection, agent, ago=30 * 60)  # 30 minutes ago
    add(connection, agent, ago=3 * 3600)  # 3 hours ago
    add(connection, agent, ago=3 * 86400)  # 3 days ago
    add(connection, agent, ago=9 * 86400)  # outside every window
    tally.tally(lag_seconds=0)
    assert stats(client, org, "1h")["counts"]["succeeded"] == 1
    assert stats(client, org, "24h")["counts"]["succeeded"] == 2
    assert stats(client, org, "7d")["counts"]["succeeded"] == 3


def test_an_idle_agent(client, org, connection):
    make_agent(client, org)
    body = stats(client, org, "1h")
    assert body == {
        "window": "1h",
        "counts": dict.fromkeys(("queued", "running", "waiting", *services.FINISHED), 0),
        "success_rate": None,
        "duration_ms": {"p50": None, "p95": None, "p99": None},
        "queue_wait_ms": {"p50": None, "p95": None, "p99": None},
        "last_failure": None,
        "health": "idle",
    }


def test_cancelled_alone_leaves_an_agent_idle(client, org, connection):
    agent = make_agent(client, org)
    add(connection, agent, "cancelled")
    body = stats(client, org)
    assert body["counts"]["cancelled"] == 1 and body["health"] == "idle"


@pytest.mark.parametrize(
    ("succeeded", "failed", "health"),
    [(19, 1, "healthy"), (18, 2, "degraded"), (10, 10, "degraded"), (9, 11, "failing")],
)
def test_health_thresholds(client, org, connection, succeeded, failed, health):
    agent = make_agent(client, org)
    for _ in range(succeeded):
        add(connection, agent)
    for _ in range(failed):
        add(connection, agent, "failed", error="runtime_error")
    assert stats(client, org)["health"] == health


def test_another_organizations_agent_is_404(client, org, other_org):
    agent = make_agent(client, org)
    for ref in ("echo", agent["id"]):
        response = client.get(f"/api/v1/agents/{ref}/stats", headers=other_org.headers)
        assert response.status_code == 404
        assert response.get_json()["code"] == 404


@pytest.mark.parametrize("window", ["2h", "", "1d", "7D"])
def test_a_bad_window_is_422(client, org, window):
    make_agent(client, org)
    response = client.get(f"/api/v1/agents/echo/stats?window={window}", headers=org.headers)
    body = response.get_json()
    assert response.status_code == 422, body
    assert "window" in str(body["errors"])


def test_tally_counts_each_execution_once_and_totals_outlive_retention(client, org, connection):
    agent = make_agent(client, org)
    for _ in range(5):
        add(connection, agent)
    tally.tally(lag_seconds=0)
    assert tally.tally(lag_seconds=0).finished == 0
    # Retention deleting executions leaves the cumulative totals alone.
    connection.execute(text("DELETE FROM executions WHERE agent_id = :a"), {"a": agent["id"]})
    tally.tally(lag_seconds=0)
    total = connection.execute(
        text("SELECT sum(executions) FROM execution_totals WHERE agent_id = :a"),
        {"a": agent["id"]},
    ).scalar_one()
    assert total == 5


def test_tally_leaves_rows_younger_than_its_lag(client, org, connection):
    agent = make_agent(client, org)
    add(connection, agent, ago=1)
    assert tally.tally(lag_seconds=3600).finished == 0
    # Still counted by the stats, live.
    assert stats(client, org)["counts"]["succeeded"] == 1
    assert tally.tally(lag_seconds=0).finished == 1


def test_tally_in_small_batches_catches_up(client, org, connection):
    agent = make_agent(client, org)
    for i in range(7):
        add(connection, agent, ago=100 + i)
    report = tally.tally(lag_seconds=0, batch=2)
    assert report.finished == 7 and report.caught_up
    assert stats(client, org)["counts"]["succeeded"] == 7


def test_percentile_math():
    histogram = [0] * buckets.BUCKETS
    assert buckets.percentile(histogram, 0.5) is None
    histogram[0] = 10  # under 1 ms
    assert 0 <= buckets.percentile(histogram, 0.5) < 1
    histogram = [0] * buckets.BUCKETS
    histogram[9] = 1  # [2, 2^(9/8)) ms
    assert 2.0 <= buckets.percentile(histogram, 0.99) < 2.0 ** (9 / 8)
    assert buckets.cumulative_at(histogram, [0, 1, 2]) == [0, 0, 1]
    histogram[buckets.LAST] = 1
    assert buckets.percentile(histogram, 1.0) == 2.0**27


def test_bucket_edges_match_the_database(connection):
    for ms, index in ((0.0, 0), (0.99, 0), (1.0, 1), (2.0, 9), (1000.0, 80), (2.0**40, 217)):
        got = connection.execute(text("SELECT runyard_hist_bucket(:ms)"), {"ms": ms}).scalar()
        assert got == index, (ms, got)
        assert buckets.lower_bound(index) <= ms < buckets.upper_bound(index)


@pytest.mark.parametrize(
    "now",
    [
        dt.datetime(2026, 12, 7, 10, 15, 42, tzinfo=dt.UTC),
        dt.datetime(2026, 12, 7, 0, 0, 0, tzinfo=dt.UTC),
        dt.datetime(2026, 12, 7, 23, 59, 59, tzinfo=dt.UTC),
        dt.datetime(2026, 12, 7, 10, 0, 30, tzinfo=dt.UTC),
    ],
)
@pytest.mark.parametrize("window", list(services.WINDOWS))
def test_rollup_spans_cover_the_window_once(now, window):
    """Every minute from the window's start to now falls in exactly one rollup row chosen."""
    edges = services.spans(now, services.WINDOWS[window])
    minute = dt.timedelta(minutes=1)
    assert edges["start"] == now - services.WINDOWS[window] - (now.second * dt.timedelta(seconds=1))
    moment = edges["start"]
    while moment <= now:
        chosen = [
            edges["start"] <= moment < edges["first_hour"] or moment >= edges["last_hour"],
            edges["first_hour"] <= moment < edges["first_day"]
            or edges["last_day"] <= moment < edges["last_hour"],
            edges["first_day"] <= moment < edges["last_day"],
        ]
        assert sum(chosen) == 1, (moment, edges)
        unit = (minute, dt.timedelta(hours=1), dt.timedelta(days=1))[chosen.index(True)]
        # The row's span is aligned and wholly inside the window.
        epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        row_start = epoch + (moment - epoch) // unit * unit
        assert row_start >= edges["start"]
        moment += minute


def test_beat_runs_the_tally_and_prunes_old_rollups(client, org, connection):
    from workers.maintenance import STATS_PRUNE_SECONDS, STATS_TALLY_SECONDS, housekeeping_jobs

    jobs = {job.name: job for job in housekeeping_jobs()}
    assert jobs["stats-tally"].every_seconds == STATS_TALLY_SECONDS
    assert jobs["stats-prune"].every_seconds == STATS_PRUNE_SECONDS
    agent = make_agent(client, org)
    add(connection, agent, ago=9 * 86400)
    add(connection, agent, ago=3600)
    tally.tally(lag_seconds=0)
    kept = text("SELECT count(*) FROM agent_stats_rollups WHERE agent_id = :a")
    assert connection.execute(kept, {"a": agent["id"]}).scalar_one() == 6  # minute, hour, day x2
    jobs["stats-prune"].run()
    assert connection.execute(kept, {"a": agent["id"]}).scalar_one() == 3
    assert stats(client, org, "7d")["counts"]["succeeded"] == 1


def test_a_chain_reruns_reused_steps_are_not_runs(client, org, connection):
    agent = make_agent(client, org)

    def reused(ago):
        # A reused step is a copy no worker ran: succeeded at attempt 0 (app/chains/reruns.py).
        copy = add(connection, agent, "succeeded", ago=ago)
        connection.execute(text("UPDATE executions SET attempt = 0 WHERE id = :id"), {"id": copy})

    add(connection, agent, "failed", ago=120, error="runtime_error")
    reused(ago=60)
    tally.tally(lag_seconds=0)
    reused(ago=1)  # past the tally's watermark: read live by the stats query
    body = stats(client, org)
    assert body["counts"]["succeeded"] == 0 and body["counts"]["failed"] == 1
    assert body["health"] == "failing"
    totals = connection.execute(
        text("SELECT status, executions FROM execution_totals WHERE agent_id = :agent"),
        {"agent": agent["id"]},
    ).all()
    assert dict(totals) == {"failed": 1}
