"""Statistics and metrics of executions run for real: HTTP submit, a Celery worker, the tally."""

import pytest

from app import metrics
from app.stats import tally
from tests.app.test_stats_metrics import scrape, value
from tests.conftest import wait_for
from tests.workers.test_runs import python_agent, run

pytestmark = pytest.mark.worker


def test_stats_and_metrics_of_executions_a_worker_ran(live_client, live_org, monkeypatch):
    monkeypatch.setattr(metrics.DATABASE, "cache_seconds", 0.0)
    python_agent(live_client, live_org, "steady", "echo")
    python_agent(live_client, live_org, "broken", "boom")
    done = [wait_for(live_client, live_org, run(live_client, live_org, "steady")) for _ in range(3)]
    failed = [
        wait_for(live_client, live_org, run(live_client, live_org, "broken")) for _ in range(2)
    ]
    assert {body["status"] for body in done} == {"succeeded"}
    assert {body["status"] for body in failed} == {"failed"}
    tally.tally(lag_seconds=0)

    steady = live_client.get("/api/v1/agents/steady/stats?window=1h", headers=live_org.headers)
    body = steady.get_json()
    assert body["counts"]["succeeded"] == 3 and body["counts"]["failed"] == 0
    assert body["success_rate"] == 1.0 and body["health"] == "healthy"
    assert body["last_failure"] is None
    longest = max(execution["duration_ms"] for execution in done)
    # duration_ms of an execution is whole milliseconds; the percentile is within one bucket.
    assert body["duration_ms"]["p99"] <= max(longest + 1, 1) * 1.1
    assert body["queue_wait_ms"]["p50"] is not None

    broken = live_client.get("/api/v1/agents/broken/stats", headers=live_org.headers).get_json()
    assert broken["counts"]["failed"] == 2 and broken["health"] == "failing"
    assert broken["last_failure"]["execution_id"] == failed[-1]["id"]
    assert broken["last_failure"]["error"]["type"] == "runtime_error"

    samples = scrape(live_client)
    finished = "runyard_executions_finished_total"
    assert value(samples, finished, org=live_org.name, agent="steady", status="succeeded") == 3
    assert value(samples, finished, org=live_org.name, agent="broken", status="failed") == 2
    assert (
        value(samples, "runyard_executions_submitted_total", org=live_org.name, agent="broken") == 2
    )
