"""Worker faults: pool processes and whole workers killed mid-execution, a warm shutdown, and a
fleet whose worker is killed every two seconds under 1,000 executions.

Each test runs the ledger agent on a queue of its own, served by workers of its own with short
leases (tests/faults/workers_fixtures.py) and a beat that sweeps every second, injects the fault,
waits for every accepted execution to end, and counts what the fault cost (harness.tally).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
import uuid

import pytest
import redis

from tests.brokers import on_rabbitmq, queue_depth
from tests.conftest import an_execution_update_waits_on_a_row_lock, own_queue, wait_until
from tests.faults.harness import (
    LEDGER_AGENT,
    install_audit,
    remove_audit,
    tally,
    wait_until_ended,
)
from tests.faults.workers_fixtures import (
    children,
    connect,
    kill_worker,
    rows,
    short_lease_worker,
    sweeping_beat,
    wait_until_running,
)
from workers.maintenance import sweep

pytestmark = pytest.mark.worker

# Generous: the machine has two cores and other test runs share them.
END_BOUND_SECONDS = 60


@pytest.fixture(scope="module", autouse=True)
def audit(database_url):
    install_audit(database_url)
    yield
    remove_audit(database_url)


@pytest.fixture
def ledger_agent(live_client, live_org):
    """The ledger agent on a queue of its own (the session worker serves `default`)."""
    queue = own_queue("faults")
    name = f"ledger-{uuid.uuid4().hex[:8]}"
    response = live_client.post(
        "/api/v1/agents",
        json={"name": name, "queue": queue, **LEDGER_AGENT},
        headers=live_org.headers,
    )
    assert response.status_code == 201, response.get_json()
    return name, queue


def submit(client, org, name: str, ledger, count: int, seconds: float) -> list[uuid.UUID]:
    ids = []
    for n in range(count):
        response = client.post(
            f"/api/v1/agents/{name}/executions",
            json={"input": {"ledger": str(ledger), "seconds": seconds, "n": n}},
            headers=org.headers,
        )
        assert response.status_code == 202, response.get_json()
        ids.append(uuid.UUID(response.get_json()["id"]))
    return ids


def attempts_of(database_url, ids) -> dict[uuid.UUID, int]:
    return {
        execution_id: row[0] for execution_id, row in rows(database_url, ids, "attempt").items()
    }


def running(database_url, ids) -> list[uuid.UUID]:
    return [i for i, (status,) in rows(database_url, ids, "status").items() if status == "running"]


def wait_for_running(database_url, ids, count: int, timeout: float = 20.0) -> list[uuid.UUID]:
    deadline = time.monotonic() + timeout
    while len(now_running := running(database_url, ids)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} running after {timeout}s"
        time.sleep(0.05)
    return now_running


def kill_to_end_seconds(database_url, ids, kill_times: list[dt.datetime]) -> list[float]:
    """For each attempt a kill interrupted: from that kill to the end of its execution."""
    with connect(database_url) as conn:
        interrupted = conn.execute(
            "SELECT a.started_at, e.finished_at FROM execution_attempts a "
            "JOIN executions e ON e.id = a.execution_id WHERE a.execution_id = ANY(%s)",
            (ids,),
        ).fetchall()
    return [
        (finished - min(kill for kill in kill_times if kill > started)).total_seconds()
        for started, finished in interrupted
    ]


def test_sigkill_of_a_pool_process_mid_execution(
    live_client, live_org, ledger_agent, tmp_path, database_url
):
    name, queue = ledger_agent
    ledger = tmp_path / "ledger.txt"
    with (
        short_lease_worker(tmp_path, "pool-kill", queue, concurrency=2) as worker,
        sweeping_beat(tmp_path),
    ):
        ids = submit(live_client, live_org, name, ledger, count=6, seconds=2)
        wait_for_running(database_url, ids, 2)
        pool_before = children(worker.pid)
        assert len(pool_before) == 2, pool_before
        os.kill(pool_before[0], signal.SIGKILL)
        recovery = wait_until_ended(database_url, ids, END_BOUND_SECONDS)
        pool_after = children(worker.pid)
    report = tally(
        "SIGKILL of a pool process mid-execution",
        database_url,
        ids,
        ledger,
        recovery,
        workers_killed=True,
        pool_before=pool_before,
        pool_after=pool_after,
    )
    assert report.lost == 0 and report.duplicated == 0, report
    assert pool_before[0] not in pool_after and len(pool_after) == 2, (pool_before, pool_after)
    attempts = attempts_of(database_url, ids)
    # Exactly the execution the killed process ran went again; the other ran once.
    assert sorted(attempts.values()) == [1, 1, 1, 1, 1, 2], attempts


def test_sigkill_of_the_whole_worker_mid_execution(
    live_client, live_org, ledger_agent, tmp_path, database_url
):
    name, queue = ledger_agent
    ledger = tmp_path / "ledger.txt"
    with sweeping_beat(tmp_path):
        with short_lease_worker(tmp_path, "killed", queue, concurrency=2) as killed:
            ids = submit(live_client, live_org, name, ledger, count=6, seconds=2)
            running_at_kill = wait_for_running(database_url, ids, 2)
            killed_at = time.monotonic()
            kill_worker(killed)
        with short_lease_worker(tmp_path, "replacement", queue, concurrency=2):
            replacement_ready_after = time.monotonic() - killed_at
            wait_until_ended(database_url, ids, END_BOUND_SECONDS)
            recovery = time.monotonic() - killed_at
    report = tally(
        "SIGKILL of a whole worker mid-execution, a new one started",
        database_url,
        ids,
        ledger,
        recovery,
        workers_killed=True,
        replacement_ready_after=round(replacement_ready_after, 1),
    )
    assert report.lost == 0 and report.duplicated == 0, report
    assert killed.returncode == -signal.SIGKILL
    attempts = attempts_of(database_url, ids)
    assert all(attempts[i] == 2 for i in running_at_kill), attempts
    assert sum(attempts.values()) == len(ids) + len(running_at_kill), attempts


def test_sigterm_lets_the_running_execution_finish_once(
    live_client, live_org, ledger_agent, tmp_path, database_url
):
    """Celery's warm shutdown: the running execution ends on the stopping worker, once; the
    queued ones stay in the broker for the next worker."""
    name, queue = ledger_agent
    ledger = tmp_path / "ledger.txt"
    with sweeping_beat(tmp_path):
        with short_lease_worker(tmp_path, "stopped", queue, concurrency=1) as stopped:
            ids = submit(live_client, live_org, name, ledger, count=4, seconds=3)
            [long_running] = wait_for_running(database_url, ids, 1)
            stopped.send_signal(signal.SIGTERM)
            stopping_since = time.monotonic()
            assert stopped.wait(timeout=20) == 0
            stop_seconds = time.monotonic() - stopping_since
            after_stop = rows(database_url, ids, "status, attempt")
        with short_lease_worker(tmp_path, "next", queue, concurrency=1):
            wait_until_ended(database_url, ids, END_BOUND_SECONDS)
            recovery = time.monotonic() - stopping_since
    report = tally(
        "SIGTERM (warm shutdown) during a long execution",
        database_url,
        ids,
        ledger,
        recovery,
        workers_killed=False,
        stop_seconds=round(stop_seconds, 1),
    )
    assert report.lost == 0 and report.duplicated == 0, report
    assert after_stop[long_running] == ("succeeded", 1), after_stop
    # Nothing else started on the stopping worker, and everything ran exactly once.
    assert all(after_stop[i] == ("queued", 0) for i in ids if i != long_running), after_stop
    assert set(attempts_of(database_url, ids).values()) == {1}


def test_sigterm_waits_for_an_outcome_still_being_recorded(
    live_client, live_org, ledger_agent, tmp_path, database_url
):
    """A pool process records an outcome after its task returned (workers/outcomes.py): a warm
    shutdown that comes meanwhile lets it commit before the process exits. The test holds the
    execution's row locked so that the finish waits, and stops the worker then: the pool process
    stays until the finish has its answer. (The finish would commit even from a process gone
    meanwhile, as it reached PostgreSQL; an outcome still waiting for the database to answer
    would not.)"""
    name, queue = ledger_agent
    ledger = tmp_path / "ledger.txt"
    with short_lease_worker(tmp_path, "stopped", queue, concurrency=1) as stopped:
        [pool_process] = children(stopped.pid)
        [execution] = submit(live_client, live_org, name, ledger, count=1, seconds=0.5)
        wait_until_running(database_url, [execution])
        with connect(database_url) as locker, locker.transaction():
            locker.execute("SELECT 1 FROM executions WHERE id = %s FOR UPDATE", (execution,))
            wait_until(an_execution_update_waits_on_a_row_lock, timeout=20)
            stopped.send_signal(signal.SIGTERM)
            time.sleep(1.5)
            assert children(stopped.pid) == [pool_process], "it exited, its outcome in flight"
        assert stopped.wait(timeout=20) == 0
    assert rows(database_url, [execution], "status, attempt")[execution] == ("succeeded", 1)


def test_sigterm_then_sigkill_when_the_execution_outlives_the_stop_timeout(
    live_client, live_org, ledger_agent, tmp_path, database_url
):
    """A supervisor stops a worker with SIGTERM and kills it when its stop timeout passes
    (docker's 10 s, systemd's 90 s). An execution longer than that dies with the worker: its
    lease runs out, and the sweeper puts it back (retry_on lost) for another worker."""
    name, queue = ledger_agent
    ledger = tmp_path / "ledger.txt"
    with sweeping_beat(tmp_path):
        with short_lease_worker(tmp_path, "outlived", queue, concurrency=1) as stopped:
            ids = submit(live_client, live_org, name, ledger, count=1, seconds=6)
            wait_until_running(database_url, ids)
            stopped.send_signal(signal.SIGTERM)
            stopping_since = time.monotonic()
            with pytest.raises(subprocess.TimeoutExpired):
                stopped.wait(timeout=2)  # the stop timeout of this "supervisor"
            kill_worker(stopped)
        with short_lease_worker(tmp_path, "after", queue, concurrency=1):
            wait_until_ended(database_url, ids, END_BOUND_SECONDS)
            recovery = time.monotonic() - stopping_since
    report = tally(
        "SIGTERM, then SIGKILL when the execution outlives the stop timeout",
        database_url,
        ids,
        ledger,
        recovery,
        workers_killed=True,
    )
    assert report.lost == 0 and report.duplicated == 0, report
    assert attempts_of(database_url, ids) == {ids[0]: 2}
    assert report.reruns == 0, "the killed attempt never reached its end"


def test_a_thousand_executions_while_a_worker_is_killed_every_two_seconds(
    live_client, live_org, ledger_agent, tmp_path, database_url
):
    name, queue = ledger_agent
    ledger = tmp_path / "ledger.txt"
    kill_times: list[dt.datetime] = []
    with (
        sweeping_beat(tmp_path),
        short_lease_worker(tmp_path, "steady", queue, concurrency=1),
    ):
        started = time.monotonic()
        # 30 ms each: long enough that every kill finds executions mid-run.
        ids = submit(live_client, live_org, name, ledger, count=1000, seconds=0.03)
        submitted_in = time.monotonic() - started
        deadline = time.monotonic() + END_BOUND_SECONDS
        while time.monotonic() < deadline:
            doomed_name = f"doomed-{len(kill_times)}"
            with short_lease_worker(tmp_path, doomed_name, queue, concurrency=2) as doomed:
                time.sleep(2)
                kill_worker(doomed)
                kill_times.append(dt.datetime.now(dt.UTC))
            if wait_until_ended(database_url, ids, 0.1) < 0.1:
                break
        wait_until_ended(database_url, ids, END_BOUND_SECONDS)
        elapsed = time.monotonic() - started
    attempts = attempts_of(database_url, ids)
    recoveries = kill_to_end_seconds(database_url, ids, kill_times)
    report = tally(
        "1,000 executions, a worker SIGKILLed every 2 s beside a steady one",
        database_url,
        ids,
        ledger,
        max(recoveries, default=0.0),
        workers_killed=True,
        kills=len(kill_times),
        submitted_in=round(submitted_in, 1),
        seconds=round(elapsed, 1),
        per_second=round(len(ids) / elapsed, 1),
        interrupted=len(recoveries),
    )
    assert report.lost == 0 and report.duplicated == 0, report
    assert len(kill_times) >= 2, report
    assert recoveries, "no kill hit a running execution"
    assert len(recoveries) == sum(count - 1 for count in attempts.values()), recoveries


def holds_countdown(execution_id: uuid.UUID, queue: str) -> bool:
    """Has a worker taken this execution's countdown (retry) message and not acknowledged it?
    kombu's Redis transport keeps such messages in the `unacked` hash as [message, exchange,
    routing key]; the message that ran attempt 1 sits there too until that task returns. On
    RabbitMQ the queue no longer holds it (the caller knows it was published: attempt 1 failed
    and was put back)."""
    if on_rabbitmq():
        return queue_depth(queue) == 0
    broker = redis.Redis.from_url(os.environ["REDIS_URL"])
    for raw in broker.hvals("unacked"):
        headers = json.loads(raw)[0]["headers"]
        if headers.get("id") == str(execution_id) and headers.get("eta"):
            return True
    return False


def test_sigkill_of_a_worker_holding_a_retry_in_its_backoff(
    live_client, live_org, tmp_path, database_url
):
    queue = own_queue("backoff")
    # The first sweep on a broker publishes every queued row again (it cannot tell a new Redis
    # from a flushed one): have it now, so that only beat's restore can bring the retry back.
    sweep()
    response = live_client.post(
        "/api/v1/agents",
        json={
            "name": "flaky-retried",
            "queue": queue,
            "runtime": {"type": "python", "entrypoint": "tests.agents:flaky"},
            "retry": {
                "max_retries": 3,
                "backoff_seconds": 4,
                "jitter": False,
                "retry_on": ["runtime_error", "lost"],
            },
        },
        headers=live_org.headers,
    )
    assert response.status_code == 201, response.get_json()
    with sweeping_beat(tmp_path) as beat:
        with short_lease_worker(tmp_path, "holding", queue, concurrency=1) as holding:
            # Submitted once the worker is up, not before: a worker slow to be seen ready (a
            # loaded machine) could otherwise run attempt 1 and the whole backoff before the
            # loop below starts watching.
            response = live_client.post(
                "/api/v1/agents/flaky-retried/executions",
                json={"input": {"succeed_on": 2}},
                headers=live_org.headers,
            )
            ids = [uuid.UUID(response.get_json()["id"])]
            deadline = time.monotonic() + 20
            # Attempt 1 failed and was put back, its countdown message was published and
            # stamped (the stamp follows the publish: killed between them, the row would be
            # published again as never dispatched, not restored), and its worker took it.
            while not (
                rows(database_url, ids, "status, attempt, dispatched_at IS NOT NULL")[ids[0]]
                == ("queued", 1, True)
                and holds_countdown(ids[0], queue)
            ):
                if time.monotonic() > deadline:
                    pytest.fail(
                        "the retry's countdown message was never taken by the worker: "
                        f"{rows(database_url, ids, 'status, attempt, error')}"
                    )
                time.sleep(0.05)
            if on_rabbitmq():
                # An empty queue is also what the instant before the retry's publish looks
                # like: let the publish and attempt 1's ack happen first.
                time.sleep(0.5)
            killed_at = time.monotonic()
            kill_worker(holding)
        with short_lease_worker(tmp_path, "after-backoff", queue, concurrency=1):
            wait_until_ended(database_url, ids, 15)
            recovery = time.monotonic() - killed_at
        beat_log = beat.log()
    report = tally(
        "SIGKILL of a worker holding a retry in its backoff",
        database_url,
        ids,
        tmp_path / "no-ledger.txt",
        recovery,
        workers_killed=True,
    )
    assert report.lost == 0 and report.duplicated == 0, report
    if on_rabbitmq():
        # RabbitMQ gave the dead worker's message back by itself: the sweeper had nothing to do.
        assert "never claimed went back" not in beat_log
    else:
        assert "1 messages taken by workers but never claimed went back" in beat_log
    assert rows(database_url, ids, "attempt")[ids[0]] == (2,)
