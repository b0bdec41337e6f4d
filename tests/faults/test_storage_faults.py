"""Storage faults under load: the broker (Redis or RabbitMQ) restarted or losing its data,
PostgreSQL restarted mid-run, crashed mid-run or down for longer than a lease.

Each test submits ledger executions to a private stack (tests/faults/private.py), breaks one of
its servers, waits for every execution to end, and counts what was lost or done twice.
"""

import collections
import os
import signal
import time

import pytest
import redis

from tests.conftest import wait_until
from tests.faults.harness import LEDGER_AGENT, tally, wait_until_ended
from tests.faults.private import WORKER_CONCURRENCY, private_stack, wait_until_healthy

pytestmark = pytest.mark.worker

OPEN = "status IN ('queued', 'running')"
# Short, so that an outage of a few seconds outlasts every running lease.
LEASE_SECONDS = 5.0
LOGGING_LEDGER = "logging-ledger"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with private_stack(
        tmp_path_factory.mktemp("storage-faults"),
        "storage",
        settings={"RUNYARD_LEASE_SECONDS": str(LEASE_SECONDS)},
    ) as opened:
        runtime = {"type": "python", "entrypoint": "tests.agents:logging_ledger"}
        agent = opened.api.call(
            "POST", "/api/v1/agents", {**LEDGER_AGENT, "name": LOGGING_LEDGER, "runtime": runtime}
        )
        assert agent.status == 201, agent.body
        yield opened


def missing_log_lines(stack, ids, lines: int) -> dict:
    """Per execution, how its log differs from the 2 * `lines` lines logging_ledger writes (the
    executions whose log is exactly that are left out)."""
    expected = collections.Counter(
        ["logged"] * lines + [f"printed {step}" for step in range(lines)]
    )
    kept = collections.defaultdict(collections.Counter)
    for execution_id, message in stack.sql(
        "SELECT execution_id, message FROM execution_logs WHERE execution_id = ANY(%s)", (ids,)
    ):
        kept[execution_id][message] += 1
    return {
        str(execution_id): {
            "missing": dict(expected - kept[execution_id]),
            "extra": dict(kept[execution_id] - expected),
        }
        for execution_id in ids
        if kept[execution_id] != expected
    }


def test_broker_restarted_with_its_data(stack):
    """Redis: redis-server stopped and started again on its data. RabbitMQ: its application
    stopped and started (`rabbitmqctl stop_app` / `start_app`), durable queues kept."""
    wait_until_healthy(stack)
    on_redis = stack.broker.name == "redis"
    if on_redis:
        broker = redis.Redis.from_url(stack.redis.url)
        run_id = broker.info("server")["run_id"]
        broker.set("storage-fault-canary", "kept")
    ids = stack.submit_ledger(200, seconds=0.05)
    injected = time.monotonic()
    try:
        stack.broker.stop()
        open_at_fault = stack.count(ids, OPEN)
        time.sleep(1)
    finally:
        stack.broker.start()
    if on_redis:
        assert broker.get("storage-fault-canary") == b"kept", "the restart kept the data"
        assert broker.info("server")["run_id"] != run_id
    wait_until_ended(stack.database_url, ids, timeout=60)
    report = tally(
        f"{stack.broker.name} restarted with its data",
        stack.database_url,
        ids,
        stack.ledger,
        time.monotonic() - injected,
        workers_killed=False,
        open_at_fault=open_at_fault,
    )
    assert open_at_fault > 0, "every execution had ended before the fault"
    assert report.lost == 0 and report.duplicated == 0, report
    # The worker rode the restart out: it reconnected instead of stopping on an error.
    assert "Unrecoverable error" not in stack.worker_log.read_text()


def test_broker_lost_its_data_with_executions_queued_and_dispatched(stack):
    """Redis: FLUSHALL. RabbitMQ: the stack's vhost deleted and made again, as a node reset
    loses every queue and message (and the sweeper's marker queue)."""
    wait_until_healthy(stack)
    ids = stack.submit_ledger(200, seconds=0.1)
    # Up to the fair window (RUNYARD_FAIR_WINDOW, 32) waits published in the broker, topped up
    # as the workers claim; the count after the flush may find a few taken meanwhile.
    wait_until(
        lambda: stack.count(ids, "status = 'queued' AND dispatched_at IS NOT NULL") >= 30,
        timeout=15,
    )
    injected = time.monotonic()
    stack.broker.lose_data()
    dispatched_at_fault = stack.count(ids, "status = 'queued' AND dispatched_at IS NOT NULL")
    running_at_fault = stack.count(ids, "status = 'running'")
    wait_until_ended(stack.database_url, ids, timeout=60)
    report = tally(
        f"{stack.broker.name} lost its data (FLUSHALL, or a vhost deleted)",
        stack.database_url,
        ids,
        stack.ledger,
        time.monotonic() - injected,
        workers_killed=False,
        dispatched_at_fault=dispatched_at_fault,
        running_at_fault=running_at_fault,
    )
    assert dispatched_at_fault >= 20, "the flush found few published messages waiting"
    assert report.lost == 0 and report.duplicated == 0, report
    # The republished duplicates were fenced by the claim: not one execution took a second
    # attempt, and those running at the flush finished on their first.
    assert stack.count(ids, "attempt <> 1") == 0


def restart_postgres(stack, name: str, ids, down_seconds: float, **details):
    """Stop the private PostgreSQL for `down_seconds`, start it again, wait for every execution
    to end and count what the outage cost."""
    return _postgres_outage(stack, stack.postgres.stop, name, ids, down_seconds, details)


def crash_postgres(stack, name: str, ids, down_seconds: float, **details):
    """Crash the private PostgreSQL: SIGQUIT to the postmaster is an immediate shutdown (no
    checkpoint; the next start runs crash recovery from the WAL), and what was committed
    without waiting for the disk may be gone. Start it again after `down_seconds`, wait for
    every execution to end and count."""
    pid_file = stack.postgres.data_dir / "postmaster.pid"
    postmaster = int(pid_file.read_text().split()[0])

    def crash() -> None:
        os.kill(postmaster, signal.SIGQUIT)
        # The postmaster removes its pid file as it exits (a zombie would still answer kill 0).
        wait_until(lambda: not pid_file.exists(), timeout=20)
        stack.postgres.stop()  # forgets the crashed server: there is nothing left to stop

    return _postgres_outage(stack, crash, name, ids, down_seconds, details)


def _postgres_outage(stack, stop, name, ids, down_seconds: float, details):
    injected = time.monotonic()
    stop()
    time.sleep(down_seconds)
    stack.start_postgres()
    wait_until_ended(stack.database_url, ids, timeout=90)
    return tally(
        name,
        stack.database_url,
        ids,
        stack.ledger,
        time.monotonic() - injected,
        workers_killed=False,
        **details,
    )


def ledger_under_way(stack) -> tuple[list, int, int, int]:
    """40 ledger executions of 0.5 s, a few of them done: their ids, how many run, how many
    wait, and the worker log's length so far (the stack's tests share it)."""
    wait_until_healthy(stack)
    ids = stack.submit_ledger(40, seconds=0.5)
    wait_until(lambda: stack.count(ids, "status = 'succeeded'") >= 3, timeout=20)
    return (
        ids,
        stack.count(ids, "status = 'running'"),
        stack.count(ids, "status = 'queued'"),
        stack.worker_log.stat().st_size,
    )


def worker_log_since(stack, offset: int) -> str:
    return stack.worker_log.read_bytes()[offset:].decode(errors="replace")


def test_postgresql_crashed_mid_run(stack):
    """A crash, not a clean stop. Whatever a worker goes on from (its claim, its outcome, a
    retry, a durable step) commits synchronously, so crash recovery brings back all a restart
    keeps: nothing is lost, no agent runs twice, and outcomes that ended while the server was
    down are written once it is back. (Log batches do not wait for the disk: a crash may lose
    the last lines of executions still running, as the README says.)"""
    ids, running_at_fault, _queued, logged = ledger_under_way(stack)
    report = crash_postgres(
        stack, "postgresql crashed mid-run", ids, 2, running_at_fault=running_at_fault
    )
    assert running_at_fault > 0, "no execution was running at the fault"
    assert report.lost == 0 and report.duplicated == 0, report
    assert stack.count(ids, "attempt <> 1") == 0, "an attempt was taken back"
    assert "the database cannot record the outcome" in worker_log_since(stack, logged)


def test_postgresql_restarted_mid_run(stack):
    ids, running_at_fault, queued_at_fault, logged = ledger_under_way(stack)
    # Down long enough for running agents to finish while the database is away.
    report = restart_postgres(
        stack,
        "postgresql restarted mid-run",
        ids,
        3,
        running_at_fault=running_at_fault,
        queued_at_fault=queued_at_fault,
    )
    assert running_at_fault > 0 and queued_at_fault > 0, (running_at_fault, queued_at_fault)
    assert report.lost == 0 and report.duplicated == 0, report
    # Outcomes finished while PostgreSQL was down were kept and written once it was back.
    assert "the database cannot record the outcome" in worker_log_since(stack, logged)


def test_postgresql_restarted_while_agents_log(stack):
    wait_until_healthy(stack)
    lines = 10
    ids = stack.submit_ledger(12, seconds=1.5, agent=LOGGING_LEDGER, lines=lines)
    wait_until(lambda: stack.count(ids, "status = 'succeeded'") >= 1, timeout=20)
    running_at_fault = stack.count(ids, "status = 'running'")
    # Running agents log all through it, and some end while the database is away.
    report = restart_postgres(
        stack, "postgresql restarted while agents log", ids, 3, running_at_fault=running_at_fault
    )
    assert running_at_fault > 0, "no execution was running at the fault"
    assert report.lost == 0 and report.duplicated == 0, report
    assert stack.count(ids, "attempt <> 1") == 0, "an attempt was taken back"
    assert missing_log_lines(stack, ids, lines) == {}


def test_postgresql_down_for_longer_than_the_lease(stack):
    wait_until_healthy(stack)
    lines = 8
    # One agent ends while the database is away, one runs on past its return; a pool process is
    # left free for the sweeps, which fail while it is away and race the workers once it is back.
    ids = [
        *stack.submit_ledger(1, seconds=4, agent=LOGGING_LEDGER, lines=lines),
        *stack.submit_ledger(1, seconds=4 * LEASE_SECONDS, agent=LOGGING_LEDGER, lines=lines),
    ]
    assert len(ids) < WORKER_CONCURRENCY
    wait_until(lambda: stack.count(ids, "status = 'running'") == len(ids), timeout=20)
    # Two leases: every running lease runs out by the database's clock while no worker can renew.
    report = restart_postgres(
        stack,
        "postgresql down for longer than the lease",
        ids,
        2 * LEASE_SECONDS,
        lease_seconds=LEASE_SECONDS,
        outage_seconds=2 * LEASE_SECONDS,
    )
    assert report.lost == 0 and report.duplicated == 0, report
    # Not one attempt was taken back by the sweeper: none failed `lost`, none ran twice.
    assert stack.count(ids, "attempt <> 1") == 0, stack.sql(
        "SELECT id, status, attempt, error FROM executions WHERE id = ANY(%s)", (ids,)
    )
    assert missing_log_lines(stack, ids, lines) == {}
