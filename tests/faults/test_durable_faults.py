"""Durable agents under the faults the suite injects: a worker killed between durable steps,
beat restarted while a sleep is due, Redis flushed while executions wait."""

from __future__ import annotations

import signal
import time
import uuid

import pytest
import redis

from tests.beat import BeatProcess
from tests.conftest import own_queue, wait_for, wait_until
from tests.faults.workers_fixtures import (
    SHORT_LEASES,
    kill_worker,
    rows,
    short_lease_worker,
    sweeping_beat,
)
from tests.workers.test_runs import define, run

pytestmark = pytest.mark.worker

END_BOUND_SECONDS = 60


def python_agent_on(client, org, name, entrypoint, queue, **extra):
    return define(
        client,
        org,
        name,
        {"type": "python", "entrypoint": f"tests.agents:{entrypoint}"},
        queue=queue,
        **extra,
    )


def status(database_url, execution_id) -> str:
    return rows(database_url, [uuid.UUID(execution_id)], "status")[uuid.UUID(execution_id)][0]


def test_a_worker_killed_between_steps_replays_without_repeating_a_recorded_step(
    live_client, live_org, tmp_path, database_url
):
    """The ledger agent appends a line per step and pauses between steps; the worker is
    SIGKILLed in a pause, the lease runs out, the sweeper requeues the attempt, and the replay
    answers the recorded steps from the journal: each line is written once."""
    queue = own_queue("durable")
    python_agent_on(
        live_client,
        live_org,
        "ledger",
        "step_ledger",
        queue,
        retry={"max_retries": 2, "retry_on": ["lost"], "backoff_seconds": 0.1},
    )
    ledger = tmp_path / "ledger.txt"
    with sweeping_beat(tmp_path):
        with short_lease_worker(tmp_path, "killed", queue, concurrency=1) as killed:
            execution_id = run(
                live_client,
                live_org,
                "ledger",
                {"path": str(ledger), "steps": 4, "pause": 1.5},
            )
            wait_until(
                lambda: ledger.exists() and len(ledger.read_text().splitlines()) >= 2, timeout=30
            )
            time.sleep(0.5)  # well inside the pause after step 1: its record has landed
            kill_worker(killed)
        assert killed.returncode == -signal.SIGKILL
        with short_lease_worker(tmp_path, "replacement", queue, concurrency=1):
            result = wait_for(live_client, live_org, execution_id, timeout=END_BOUND_SECONDS)
    assert result["status"] == "succeeded", result
    assert result["output"] == {"attempt": 2}
    assert ledger.read_text().splitlines() == ["step 0", "step 1", "step 2", "step 3"]
    entries = live_client.get(
        f"/api/v1/executions/{execution_id}/journal", headers=live_org.headers
    ).get_json()
    assert [entry["name"] for entry in entries] == [f"write-{n}" for n in range(4)]


def test_a_sleep_survives_a_beat_restart(live_client, live_org, tmp_path, database_url):
    queue = own_queue("durable-sleep")
    python_agent_on(live_client, live_org, "sleeper", "sleeper", queue)
    with short_lease_worker(tmp_path, "sleeps", queue):
        first = BeatProcess(tmp_path, "first", env=SHORT_LEASES)
        try:
            first.wait_ready()
            execution_id = run(live_client, live_org, "sleeper", {"seconds": 3})
            wait_until(lambda: status(database_url, execution_id) == "waiting", timeout=20)
        finally:
            first.stop()
        time.sleep(4)  # due while no beat runs: nothing wakes it
        assert status(database_url, execution_id) == "waiting"
        with sweeping_beat(tmp_path, "second"):
            result = wait_for(live_client, live_org, execution_id, timeout=30)
    assert result["status"] == "succeeded", result
    assert result["output"]["slept"] >= 3


def test_a_redis_flush_while_executions_wait_loses_none(
    live_client, live_org, tmp_path, database_url
):
    """Parents waiting on sleeping children, and sleepers, while the broker's database is
    flushed: the waits live in PostgreSQL, and the sweeper republishes what the broker lost."""
    queue = own_queue("durable-flush")
    python_agent_on(live_client, live_org, "sleeper", "sleeper", queue)
    python_agent_on(live_client, live_org, "fan", "fan_out", queue)
    python_agent_on(live_client, live_org, "double", "double", queue)
    with short_lease_worker(tmp_path, "flushed", queue), sweeping_beat(tmp_path):
        sleepers = [run(live_client, live_org, "sleeper", {"seconds": 2}) for _ in range(5)]
        parents = [
            run(live_client, live_org, "fan", {"child": "double", "count": 5}) for _ in range(3)
        ]
        wait_until(lambda: all(status(database_url, s) == "waiting" for s in sleepers), timeout=30)
        broker = redis.Redis.from_url(_redis_url())
        broker.flushdb()
        results = [
            wait_for(live_client, live_org, execution_id, timeout=END_BOUND_SECONDS)
            for execution_id in sleepers + parents
        ]
    assert [r["status"] for r in results] == ["succeeded"] * 8, results
    assert all(r["output"]["total"] == 20 for r in results[5:]), results[5:]


def _redis_url() -> str:
    import os

    return os.environ["REDIS_URL"]
