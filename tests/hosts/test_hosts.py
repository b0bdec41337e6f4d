"""Worker hosts (issue 18): three network namespaces with a worker each, on the session's broker,
and a beat sweeping every second in the root namespace (tests/hosts/conftest.py). Executions
spread over the hosts; a host killed whole or cut off from the network loses nothing and runs
nothing twice (tests/faults/harness.py's tally); a cut-off host's late write is fenced and its
worker serves again once the link is back; a concurrency limit holds across the hosts.
"""

from __future__ import annotations

import collections
import time
import uuid

import pytest

from tests.conftest import wait_until
from tests.faults.harness import LEDGER_AGENT, TERMINAL, tally, wait_until_ended
from tests.faults.test_flow_control import ledger_runs, limited_agent, most_at_once
from tests.faults.workers_fixtures import LEASE_SECONDS, rows

pytestmark = pytest.mark.worker

# Generous: the machine has two cores and other test runs share them.
END_BOUND_SECONDS = 60


def ledger_agent(client, org, queue: str) -> str:
    name = f"ledger-{uuid.uuid4().hex[:8]}"
    response = client.post(
        "/api/v1/agents", json={"name": name, "queue": queue, **LEDGER_AGENT}, headers=org.headers
    )
    assert response.status_code == 201, response.get_json()
    return name


def submit(client, org, agent: str, payloads: list[dict]) -> list[uuid.UUID]:
    ids = []
    for payload in payloads:
        response = client.post(
            f"/api/v1/agents/{agent}/executions", json={"input": payload}, headers=org.headers
        )
        assert response.status_code == 202, response.get_json()
        ids.append(uuid.UUID(response.get_json()["id"]))
    return ids


def ledger_inputs(ledger, count: int, seconds: float) -> list[dict]:
    return [{"ledger": str(ledger), "seconds": seconds, "n": n} for n in range(count)]


def claimed_by(hosts, database_url, ids) -> dict[uuid.UUID, tuple[str, int, int | None]]:
    """(status, attempt, host index of the worker that claimed last) of each execution."""
    return {
        execution_id: (status, attempt, hosts.host_of(worker))
        for execution_id, (status, attempt, worker) in rows(
            database_url, ids, "status, attempt, worker"
        ).items()
    }


def test_executions_spread_over_three_hosts(app, live_org, hosts, tmp_path, database_url):
    """24 short executions on the queue all hosts serve: every host's worker claimed some (the
    worker recorded at claim); none lost, none run twice."""
    client = app.test_client()
    agent = ledger_agent(client, live_org, hosts.queue)
    ledger = tmp_path / "ledger.txt"
    ids = submit(client, live_org, agent, ledger_inputs(ledger, 24, 0.2))
    recovery = wait_until_ended(database_url, ids, END_BOUND_SECONDS)
    report = tally(
        "hosts: 24 executions over three hosts",
        database_url,
        ids,
        ledger,
        recovery,
        workers_killed=False,
    )
    assert report.lost == 0 and report.duplicated == 0, report
    per_host = collections.Counter(
        host for _, _, host in claimed_by(hosts, database_url, ids).values()
    )
    assert set(per_host) == {host.index for host in hosts.hosts}, per_host


def test_a_concurrency_limit_holds_across_hosts(app, live_org, hosts, tmp_path, database_url):
    """concurrency {"limit": 2} over three hosts of two processes each: never 3 at once, 2 do,
    and every host ran some."""
    client = app.test_client()
    agent = limited_agent(client, live_org, "timed", hosts.queue, concurrency={"limit": 2})
    ledger = tmp_path / "ledger.txt"
    ids = submit(client, live_org, agent, ledger_inputs(ledger, 12, 0.4))
    wait_until_ended(database_url, ids, END_BOUND_SECONDS)
    ended = claimed_by(hosts, database_url, ids)
    assert {status for status, _, _ in ended.values()} == {"succeeded"}, ended
    runs = ledger_runs(ledger)
    assert len(runs) == len(ids), runs
    assert most_at_once([(run.started, run.ended) for run in runs]) == 2, runs
    stored = rows(database_url, ids, "started_at, finished_at").values()
    assert most_at_once(list(stored)) <= 2, stored
    per_host = collections.Counter(host for _, _, host in ended.values())
    assert set(per_host) == {host.index for host in hosts.hosts}, per_host


def test_a_host_killed_whole_loses_nothing(app, live_org, hosts, tmp_path, database_url):
    """Every process of one host SIGKILLed while it runs executions: they run again elsewhere
    once their lease ran out; none lost, none committed twice."""
    client = app.test_client()
    agent = ledger_agent(client, live_org, hosts.queue)
    ledger = tmp_path / "ledger.txt"
    ids = submit(client, live_org, agent, ledger_inputs(ledger, 9, 2.0))
    victim = hosts.hosts[0]

    def victim_running() -> list[uuid.UUID]:
        now = claimed_by(hosts, database_url, ids)
        return [
            i for i, (status, _, host) in now.items() if (status, host) == ("running", victim.index)
        ]

    running_on_victim = wait_until(victim_running, timeout=20)
    killed_at = time.monotonic()
    killed = victim.kill_everything()
    assert hosts.workers[victim.index].wait(timeout=5) is not None
    recovery = wait_until_ended(database_url, ids, END_BOUND_SECONDS)
    report = tally(
        "hosts: a host killed whole (every process in its namespace)",
        database_url,
        ids,
        ledger,
        time.monotonic() - killed_at,
        workers_killed=True,
        processes_killed=len(killed),
    )
    assert report.lost == 0 and report.duplicated == 0, (report, recovery)
    ended = claimed_by(hosts, database_url, ids)
    for execution_id in running_on_victim:
        _, attempt, host = ended[execution_id]
        assert attempt == 2 and host != victim.index, ended[execution_id]
    # The lease, a sweep, a claim and the 2 s run again; the rest is slack for a busy machine.
    assert report.recovery_seconds < LEASE_SECONDS + 20, report


def test_a_cut_off_host_is_fenced_and_serves_again(app, live_org, hosts, tmp_path, database_url):
    """A host's link goes down while it runs executions: their leases run out and they run
    elsewhere (attempt 2). When the link is back, the cut-off worker's late finishes are fenced
    out (one terminal write per execution, the other host's), and the same worker process claims
    and finishes new executions."""
    client = app.test_client()
    agent = ledger_agent(client, live_org, hosts.queue)
    ledger = tmp_path / "ledger.txt"
    # Six slots, six executions outliving the lease: two on each host.
    ids = submit(client, live_org, agent, ledger_inputs(ledger, 6, LEASE_SECONDS + 1))
    cut_off = hosts.hosts[2]
    worker_before = hosts.workers[cut_off.index]

    def all_running_and_cut_off_host_busy() -> list[uuid.UUID]:
        now = claimed_by(hosts, database_url, ids)
        if any(status != "running" for status, _, _ in now.values()):
            return []
        return [i for i, (_, _, host) in now.items() if host == cut_off.index]

    on_cut_off = wait_until(all_running_and_cut_off_host_busy, timeout=20)
    cut_at = time.monotonic()
    cut_off.cut()
    try:

        def taken_elsewhere() -> bool:
            now = claimed_by(hosts, database_url, on_cut_off)
            return all(attempt == 2 and host != cut_off.index for _, attempt, host in now.values())

        # The lease runs out, the sweeper requeues, a slot frees on another host (its own
        # executions end after LEASE_SECONDS + 1) and claims.
        wait_until(taken_elsewhere, timeout=3 * LEASE_SECONDS + 10)
        cut_seconds = time.monotonic() - cut_at
    finally:
        cut_off.reconnect()
    recovery = wait_until_ended(database_url, ids, END_BOUND_SECONDS)
    log_path = hosts.log_path(cut_off)

    def fenced_in_log() -> bool:
        log = log_path.read_text(errors="replace")
        return all(f"execution {i} attempt 1: outcome fenced out" in log for i in on_cut_off)

    wait_until(fenced_in_log, timeout=30, interval=0.2)
    report = tally(
        "hosts: a host cut off while it runs executions, then reconnected",
        database_url,
        ids,
        ledger,
        time.monotonic() - cut_at,
        workers_killed=True,
        cut_seconds=round(cut_seconds, 1),
    )
    assert report.lost == 0 and report.duplicated == 0, (report, recovery)
    ended = claimed_by(hosts, database_url, on_cut_off)
    assert all(attempt == 2 and host != cut_off.index for _, attempt, host in ended.values()), ended
    # Their work ran to its end on both hosts: the cut-off host's run is in the ledger too.
    ran = collections.Counter(line.split()[0] for line in ledger.read_text().splitlines())
    assert all(ran[str(i)] == 2 for i in on_cut_off), ran

    # The same worker process serves again: work only its host's queue carries.
    own = ledger_agent(client, live_org, hosts.own_queue(cut_off))
    again = submit(client, live_org, own, ledger_inputs(tmp_path / "again.txt", 2, 0.1))

    def served_or_exited() -> bool:
        statuses = {status for status, _, _ in claimed_by(hosts, database_url, again).values()}
        return worker_before.poll() is not None or statuses <= set(TERMINAL)

    wait_until(served_or_exited, timeout=30, interval=0.2)
    served = claimed_by(hosts, database_url, again)
    assert hosts.workers[cut_off.index] is worker_before and worker_before.poll() is None, (
        f"the cut-off host's worker exited ({worker_before.returncode}): "
        + "".join(line for line in log_path.open(errors="replace") if "CRITICAL" in line)[-2000:]
    )
    assert set(served.values()) == {("succeeded", 1, cut_off.index)}, served
