"""/metrics: execution counters and histograms from the tally's totals, live gauges, agents past
RUNYARD_METRICS_MAX_AGENTS as `other`, quota refusals, schedule lag."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from app import metrics
from app.config import current_config, use_config
from app.stats import tally
from tests.app.test_executions_api import ECHO, make_agent, submit
from tests.app.test_quotas import set_limits
from tests.app.test_stats import add


@pytest.fixture(autouse=True)
def fresh_scrapes(monkeypatch):
    monkeypatch.setattr(metrics.DATABASE, "cache_seconds", 0.0)


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_execution_counters_and_histograms_after_a_tally(client, org, connection):
    agent = make_agent(client, org)
    for duration in (3.0, 30.0, 300.0):
        add(connection, agent, duration_ms=duration, wait_ms=10.0)
    add(connection, agent, "failed", duration_ms=2000.0, wait_ms=10.0, error="runtime_error")
    tally.tally(lag_seconds=0)
    samples = scrape(client)
    # Rows inserted directly count as submitted too (by queued_at), whatever their status.
    assert value(samples, "runyard_executions_submitted_total", org=org.name, agent="echo") == 4
    finished = "runyard_executions_finished_total"
    assert value(samples, finished, org=org.name, agent="echo", status="succeeded") == 3
    assert value(samples, finished, org=org.name, agent="echo", status="failed") == 1
    duration = "runyard_execution_duration_seconds"
    assert value(samples, f"{duration}_count", org=org.name, agent="echo") == 4
    assert value(samples, f"{duration}_bucket", org=org.name, agent="echo", le="0.004") == 1
    assert value(samples, f"{duration}_bucket", org=org.name, agent="echo", le="0.064") == 2
    assert value(samples, f"{duration}_bucket", org=org.name, agent="echo", le="1.024") == 3
    assert value(samples, f"{duration}_bucket", org=org.name, agent="echo", le="+Inf") == 4
    total = value(samples, f"{duration}_sum", org=org.name, agent="echo")
    assert total == pytest.approx(2.333, abs=0.002)
    wait = "runyard_queue_wait_seconds"
    assert value(samples, f"{wait}_count", org=org.name, queue="default") == 4
    assert value(samples, f"{wait}_bucket", org=org.name, queue="default", le="0.016") == 4

    # Counted once: a second tally adds nothing; retention deleting rows takes nothing away.
    connection.execute(text("DELETE FROM executions WHERE agent_id = :a"), {"a": agent["id"]})
    tally.tally(lag_seconds=0)
    again = scrape(client)
    assert value(again, finished, org=org.name, agent="echo", status="succeeded") == 3


def test_gauges_are_live(client, org, connection):
    make_agent(client, org)
    for _ in range(3):
        assert submit(client, org).status_code == 202
    connection.execute(
        text(
            "UPDATE executions SET queued_at = now() - interval '90 seconds' WHERE id = "
            "(SELECT id FROM executions WHERE org_id = :org LIMIT 1)"
        ),
        {"org": org.id},
    )
    connection.execute(
        text(
            "UPDATE executions SET status = 'running', attempt = 1, started_at = now(), "
            "lease_until = now() + interval '1 minute' WHERE id = (SELECT id FROM executions "
            "WHERE org_id = :org AND status = 'queued' ORDER BY queued_at DESC LIMIT 1)"
        ),
        {"org": org.id},
    )
    samples = scrape(client)
    assert value(samples, "runyard_executions_queued", org=org.name, queue="default") == 2
    assert value(samples, "runyard_executions_running", org=org.name) == 1
    age = value(samples, "runyard_oldest_queued_age_seconds", queue="default")
    assert 90 <= age < 3600


def test_agents_past_the_bound_count_as_other(client, org, connection):
    original = current_config()
    use_config(dataclasses.replace(original, metrics_max_agents=2))
    try:
        volumes = {"busy": 5, "middle": 3, "quiet": 1, "quieter": 1}
        for name, count in volumes.items():
            agent = make_agent(client, org, {**ECHO, "name": name})
            for _ in range(count):
                add(connection, agent)
        tally.tally(lag_seconds=0)
        samples = scrape(client)
    finally:
        use_config(original)
    finished = "runyard_executions_finished_total"
    for agent, count in (("busy", 5), ("middle", 3), ("other", 2)):
        assert value(samples, finished, org=org.name, agent=agent, status="succeeded") == count
    assert value(samples, finished, org=org.name, agent="quiet", status="succeeded") is None
    submitted = "runyard_executions_submitted_total"
    assert value(samples, submitted, org=org.name, agent="other") == 2
    duration = "runyard_execution_duration_seconds_count"
    assert value(samples, duration, org=org.name, agent="other") == 2


def test_quota_refusals_are_counted_per_org_and_limit(client, org, connection):
    make_agent(client, org)
    set_limits(org, max_queued=1)
    before = value(
        scrape(client), "runyard_quota_rejections_total", org=org.name, limit="max_queued"
    )
    assert submit(client, org).status_code == 202
    assert submit(client, org).status_code == 429
    assert submit(client, org).status_code == 429
    after = value(
        scrape(client), "runyard_quota_rejections_total", org=org.name, limit="max_queued"
    )
    assert after == (before or 0) + 2


def test_schedule_lag_histogram(client, org, connection):
    make_agent(client, org)
    schedule = client.post(
        "/api/v1/schedules",
        json={
            "name": "nightly",
            "target": {"agent": "echo"},
            "cron": "0 3 * * *",
            "input": {"text": "x"},
        },
        headers=org.headers,
    )
    assert schedule.status_code == 201, schedule.get_json()
    lag = "runyard_schedule_lag_seconds"
    samples = scrape(client)
    before = value(samples, f"{lag}_count") or 0
    before_fast = value(samples, f"{lag}_bucket", le="1.024") or 0
    # Fired just now: the tally's watermark may already stand at other tests' fires.
    fired = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    for seconds in (0.5, 40.0):
        connection.execute(
            text(
                "INSERT INTO schedule_fires (schedule_id, fire_time, org_id, fired_at, kind, "
                "status) VALUES (:s, :t, :org, :fired, 'scheduled', 'fired')"
            ),
            {
                "s": schedule.get_json()["id"],
                "t": fired - dt.timedelta(seconds=seconds),
                "org": org.id,
                "fired": fired,
            },
        )
    tally.tally(lag_seconds=0)
    samples = scrape(client)
    assert value(samples, f"{lag}_count") == before + 2
    assert value(samples, f"{lag}_bucket", le="1.024") == before_fast + 1  # 0.5 s, not 40 s


def test_notification_deliveries_that_ended_are_counted_by_status(client, connection):
    connection.execute(
        text(
            "INSERT INTO notification_totals (status, events) VALUES ('delivered', 2), "
            "('failed', 1) ON CONFLICT (status) DO UPDATE SET events = excluded.events"
        )
    )
    samples = scrape(client)
    assert value(samples, "runyard_notifications_total", status="delivered") == 2
    assert value(samples, "runyard_notifications_total", status="failed") == 1
    assert value(samples, "runyard_notifications_total", status="pending") is None
