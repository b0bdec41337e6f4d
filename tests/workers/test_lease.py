"""The lease heartbeat: a running attempt's lease is short and renewed by its worker, so a dead
worker's execution comes back within the lease and a sweep, not after the agent's timeout."""

import os
import signal
import time
import uuid

import pytest
from sqlalchemy import text

from app.executions import store
from tests.conftest import own_queue, wait_until
from tests.faults.harness import LEDGER_AGENT, wait_until_ended
from tests.faults.workers_fixtures import (
    LEASE_SECONDS,
    SWEEP_INTERVAL_SECONDS,
    children,
    rows,
    short_lease_worker,
    sweeping_beat,
    wait_until_running,
)

SLEEP_SCRIPT = (
    "import time\ndef main(input, ctx):\n    time.sleep(input['seconds'])\n    return {}\n"
)
SLEEP_COMMAND = (
    "import json, os, sys, time\n"
    "time.sleep(json.load(sys.stdin)['seconds'])\n"
    "json.dump({}, open(os.environ['RUNYARD_OUTPUT_PATH'], 'w'))\n"
)
RUNTIMES = {
    "python": {"type": "python", "entrypoint": "tests.agents:sleepy"},
    "script": {"type": "script", "language": "python", "source": SLEEP_SCRIPT},
    "command": {"type": "command", "argv": ["python3", "-c", SLEEP_COMMAND]},
}


def define(client, org, name, queue, **fields):
    response = client.post(
        "/api/v1/agents",
        json={"name": name, "queue": queue, "timeout_seconds": 300, **fields},
        headers=org.headers,
    )
    assert response.status_code == 201, response.get_json()


def submit(client, org, name, payload) -> uuid.UUID:
    response = client.post(
        f"/api/v1/agents/{name}/executions", json={"input": payload}, headers=org.headers
    )
    assert response.status_code == 202, response.get_json()
    return uuid.UUID(response.get_json()["id"])


def lease_of(connection, execution_id):
    return connection.execute(
        text("SELECT lease_until FROM executions WHERE id = :id"), {"id": execution_id}
    ).scalar()


def test_renewal_is_fenced_by_the_attempt(client, org, connection):
    define(client, org, "renewed", "default", runtime=RUNTIMES["python"])
    execution_id = submit(client, org, "renewed", {})
    first = store.claim(connection, execution_id, "worker-a", 30)[0]
    claimed_lease = lease_of(connection, execution_id)
    # now() is fixed inside the test's transaction: a longer lease shows the renewal.
    assert store.renew_leases(connection, [first], 300) == {execution_id}
    assert (lease_of(connection, execution_id) - claimed_lease).total_seconds() == 270
    # The sweeper took attempt 1 back and another worker claimed attempt 2.
    connection.execute(
        text("UPDATE executions SET status = 'queued' WHERE id = :id"), {"id": execution_id}
    )
    second = store.claim(connection, execution_id, "worker-b", 30)[0]
    assert second.attempt == 2
    assert store.renew_leases(connection, [first], 3000) == set(), "a stale attempt"
    assert (lease_of(connection, execution_id) - claimed_lease).total_seconds() == 0
    usage = {"cpu_seconds": 0, "max_rss_mb": 0, "wall_ms": 0}
    assert store.finish(connection, second, status="succeeded", output={}, error=None, usage=usage)
    assert store.renew_leases(connection, [second], 3000) == set(), "a finished attempt"
    assert lease_of(connection, execution_id) is None
    assert store.renew_leases(connection, [], 30) == set()


@pytest.mark.worker
def test_leases_of_every_runtime_move_forward_while_they_run(
    live_client, live_org, tmp_path, database_url
):
    queue = own_queue("lease")
    for runtime_type, runtime in RUNTIMES.items():
        define(live_client, live_org, f"long-{runtime_type}", queue, runtime=runtime)
    seconds = 3 * LEASE_SECONDS
    with (
        short_lease_worker(tmp_path, "lease", queue, concurrency=3),
        sweeping_beat(tmp_path),
    ):
        ids = [
            submit(live_client, live_org, f"long-{runtime_type}", {"seconds": seconds})
            for runtime_type in RUNTIMES
        ]
        wait_until_running(database_url, ids)
        seen: dict[uuid.UUID, list] = {execution_id: [] for execution_id in ids}
        deadline = time.monotonic() + seconds + 30
        while time.monotonic() < deadline:
            current = rows(database_url, ids, "status, lease_until")
            for execution_id, (status, lease_until) in current.items():
                if status == "running" and lease_until not in seen[execution_id]:
                    seen[execution_id].append(lease_until)
            if all(status != "running" for status, _ in current.values()):
                break
            time.sleep(0.25)
    final = rows(database_url, ids, "status, attempt, agent_name")
    for execution_id in ids:
        status, attempts, name = final[execution_id]
        # Three leases long, under a sweeper running every second: only renewals kept it.
        assert (status, attempts) == ("succeeded", 1), (name, status, attempts)
        leases = seen[execution_id]
        assert len(leases) >= 3, (name, leases)
        assert leases == sorted(leases), (name, leases)
        assert (leases[-1] - leases[0]).total_seconds() >= LEASE_SECONDS, (name, leases)


@pytest.mark.worker
def test_a_killed_pool_process_is_taken_back_within_the_lease_and_a_sweep(
    live_client, live_org, tmp_path, database_url
):
    queue = own_queue("killed")
    define(live_client, live_org, "killed", queue, **LEDGER_AGENT)
    ledger = tmp_path / "ledger.txt"
    with (
        short_lease_worker(tmp_path, "killed", queue, concurrency=1) as worker,
        sweeping_beat(tmp_path),
    ):
        execution_id = submit(
            live_client, live_org, "killed", {"ledger": str(ledger), "seconds": 4}
        )
        wait_until_running(database_url, [execution_id])
        [pool_pid] = children(worker.pid)
        os.kill(pool_pid, signal.SIGKILL)
        killed_at = time.monotonic()

        def attempt_two_started():
            return rows(database_url, [execution_id], "attempt")[execution_id][0] >= 2

        # The agent's timeout is 300 s: before the heartbeat the lease ran 360 s.
        wait_until(attempt_two_started, timeout=60, interval=0.1)
        taken_back = time.monotonic() - killed_at
        wait_until_ended(database_url, [execution_id], timeout=30)
        assert children(worker.pid) != [pool_pid], "billiard replaced the killed process"
    assert taken_back < LEASE_SECONDS + SWEEP_INTERVAL_SECONDS + 4, taken_back
    result = live_client.get(
        f"/api/v1/executions/{execution_id}", headers=live_org.headers
    ).get_json()
    assert (result["status"], result["attempts"]) == ("succeeded", 2), result
    attempts = live_client.get(
        f"/api/v1/executions/{execution_id}/attempts", headers=live_org.headers
    ).get_json()
    assert [(a["attempt"], a["status"]) for a in attempts] == [(1, "failed"), (2, "succeeded")]
    assert attempts[0]["error"]["type"] == "lost"
    # Attempt 1 died before its work ran to its end; attempt 2 did it once.
    assert ledger.read_text().split() == [str(execution_id), "2"]
