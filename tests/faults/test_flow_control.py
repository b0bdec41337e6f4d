"""Flow control with real workers (API.md, "Flow control: quotas, concurrency, rate limits,
fairness, batches"): what the limits promise, checked on what the agents themselves record.

The `tests.agents:timed` agent appends one line per run to a ledger file: its execution, when
its work started and ended (one clock for every worker process) and its customer. The tests
count how many runs overlapped, and read started_at / finished_at as the API shows them.

Most tests share two workers of four processes each on a queue of the module's own, and a beat
that sweeps every second and ticks the gates every 0.25 s, all with short leases and a fair
window of 4 (as the in-process API has while the module runs). The worker-kill test starts
workers of its own; the broker flush and the PostgreSQL restart run on a private stack
(tests/faults/private.py) whose servers they break.

The tests of the last section fail on main as of 271adb5: each pins down one way the gates
break the contract, and says what the contract asks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from app.config import current_config, use_config
from app.db import db
from app.flow import services as flow_limits
from tests.beat import BeatProcess
from tests.conftest import RUN_ID, celery_worker, own_queue, wait_until
from tests.faults.harness import REPORTS, FaultReport, wait_until_ended
from tests.faults.private import Stack, private_stack, wait_until_healthy
from tests.faults.workers_fixtures import (
    LEASE_SECONDS,
    SHORT_LEASES,
    SWEEP_INTERVAL_SECONDS,
    connect,
    kill_worker,
    rows,
    wait_until_running,
)

pytestmark = pytest.mark.worker

FAIR_WINDOW = 4
# Workers and beat read these (the in-process API gets the same fair window from `flow`).
FLOW_ENV = {**SHORT_LEASES, "RUNYARD_FAIR_WINDOW": str(FAIR_WINDOW)}
PROCESSES_PER_WORKER = 4
# Generous: the machine has two cores and other test runs share them.
END_BOUND_SECONDS = 60.0


# ---------------------------------------------------------------------------------------------
# Agents with limits


def define_limited(
    post: Callable[[dict], tuple[int, Any]],
    function: str,
    queue: str,
    *,
    concurrency: dict | None = None,
    rate_limit: dict | None = None,
    **fields: Any,
) -> str:
    """Create an agent running `tests.agents:<function>` on `queue` with the given flow control
    (and other fields of its definition) through `post`; its name."""
    name = f"{function}-{uuid.uuid4().hex[:8]}"
    body = {
        "name": name,
        "queue": queue,
        "runtime": {"type": "python", "entrypoint": f"tests.agents:{function}"},
        **({} if concurrency is None else {"concurrency": concurrency}),
        **({} if rate_limit is None else {"rate_limit": rate_limit}),
        **fields,
    }
    status, created = post(body)
    assert status == 201, created
    # Read back normalized: on_limit spelled out.
    assert created["concurrency"] == (
        None if concurrency is None else {"on_limit": "queue", **concurrency}
    ), created
    assert created["rate_limit"] == rate_limit, created
    return name


def limited_agent(client, org, function: str, queue: str, **limits) -> str:
    """define_limited through the in-process API, in `org`."""

    def post(body: dict) -> tuple[int, Any]:
        response = client.post("/api/v1/agents", json=body, headers=org.headers)
        return response.status_code, response.get_json()

    return define_limited(post, function, queue, **limits)


def set_max_running(org, value: int | None) -> None:
    """The organization's max_running, as `runyard orgs limits --max-running` sets it. Every
    process reads limits afresh: the tests run with RUNYARD_LIMITS_CACHE_SECONDS=0."""
    with db.session() as session:
        flow_limits.set_limits(session, org.name, {"max_running": value})
        session.commit()


# ---------------------------------------------------------------------------------------------
# Submitting, reading, counting


def submit(client, org, agent: str, payload: dict) -> dict:
    response = client.post(
        f"/api/v1/agents/{agent}/executions", json={"input": payload}, headers=org.headers
    )
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def read(client, org, execution_id) -> dict:
    response = client.get(f"/api/v1/executions/{execution_id}", headers=org.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def submit_at_once(app, org, agent: str, payloads: list[dict]) -> list[tuple[int, dict]]:
    """Submit every payload from a thread of its own, released together: (status, body)."""
    barrier = threading.Barrier(len(payloads))

    def one(payload: dict) -> tuple[int, dict]:
        client = app.test_client()
        barrier.wait(timeout=10)
        response = client.post(
            f"/api/v1/agents/{agent}/executions", json={"input": payload}, headers=org.headers
        )
        return response.status_code, response.get_json()

    with ThreadPoolExecutor(len(payloads)) as pool:
        return list(pool.map(one, payloads))


@dataclasses.dataclass(frozen=True)
class Run:
    execution_id: str
    attempt: int
    started: float
    ended: float
    customer: str


def ledger_runs(path: Path) -> list[Run]:
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        execution_id, attempt, started, ended, customer = line.split()
        runs.append(Run(execution_id, int(attempt), float(started), float(ended), customer))
    return runs


def most_at_once(intervals: list[tuple[Any, Any]]) -> int:
    """The most intervals (start, end) open at one instant; one that ends as another starts
    does not overlap it."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, change in events:  # at the same instant, -1 sorts before +1
        current += change
        most = max(most, current)
    return most


def most_starts_within(starts: list[dt.datetime], seconds: float) -> int:
    """The most starts in any window [t, t + seconds)."""
    ordered = sorted(starts)
    window = dt.timedelta(seconds=seconds)
    return max(
        sum(1 for later in ordered[i:] if later < start + window) for i, start in enumerate(ordered)
    )


def at(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def run_intervals(database_url: str, ids) -> dict[uuid.UUID, tuple]:
    """(status, started_at, finished_at, error) of each execution, as stored."""
    return rows(database_url, list(ids), "status, started_at, finished_at, error")


def assert_all_succeeded(database_url: str, ids) -> None:
    statuses = rows(database_url, list(ids), "status, error")
    failed = {i: row for i, row in statuses.items() if row[0] != "succeeded"}
    assert len(statuses) == len(ids) and not failed, failed


def note(name: str, accepted: int, seconds: float, **timings: float) -> None:
    """What a test measured, for the fault suite's end-of-run summary (its counts are
    asserted: nothing lost or run twice)."""
    REPORTS.append(FaultReport(name, accepted, 0, 0, 0, seconds, timings=timings))


def database_now(database_url: str) -> dt.datetime:
    with connect(database_url) as conn:
        return conn.execute("SELECT clock_timestamp()").fetchone()[0]


# ---------------------------------------------------------------------------------------------
# Processes


@contextlib.contextmanager
def beat_with(directory: Path, env: dict[str, str], name: str = "beat") -> Iterator[BeatProcess]:
    beat = BeatProcess(directory, name, env=env)
    try:
        beat.wait_ready()
        yield beat
    finally:
        beat.stop()


@dataclasses.dataclass
class Flow:
    queue: str
    directory: Path


@pytest.fixture(scope="module")
def flow(app, worker, tmp_path_factory) -> Iterator[Flow]:
    """Two workers of four processes on the module's queue, a beat, and the in-process API with
    the fair window of the workers and the beat."""
    saved = current_config()
    use_config(dataclasses.replace(saved, fair_window=FAIR_WINDOW))
    directory = tmp_path_factory.mktemp("flow")
    queue = own_queue("flow")
    try:
        with (
            beat_with(directory, FLOW_ENV),
            celery_worker(
                directory / "flow-1.log",
                queues=queue,
                concurrency=PROCESSES_PER_WORKER,
                name="flow-1",
                env=FLOW_ENV,
            ),
            celery_worker(
                directory / "flow-2.log",
                queues=queue,
                concurrency=PROCESSES_PER_WORKER,
                name="flow-2",
                env=FLOW_ENV,
            ),
        ):
            yield Flow(queue, directory)
    finally:
        use_config(saved)


# ---------------------------------------------------------------------------------------------
# 1. Limits hold over two worker processes


def test_concurrency_per_key_holds_over_two_workers(
    live_client, live_org, flow, tmp_path, database_url
):
    """concurrency {"limit": 2, "key": "$.input.customer"} over 2 workers x 4 processes: never 3
    runs of one customer at once; 2 at once, and both customers at once, do happen."""
    agent = limited_agent(
        live_client,
        live_org,
        "timed",
        flow.queue,
        concurrency={"limit": 2, "key": "$.input.customer"},
    )
    ledger = tmp_path / "ledger.txt"
    submitted = [
        submit(
            live_client,
            live_org,
            agent,
            {"ledger": str(ledger), "seconds": 0.6, "customer": customer, "n": n},
        )
        for n in range(8)
        for customer in ("acme", "globex")
    ]
    ids = [uuid.UUID(body["id"]) for body in submitted]
    # The first two of each customer may go at once; the others wait for the customer's slot.
    assert {body["waiting_for"] for body in submitted} <= {None, "agent_concurrency"}
    assert sum(body["waiting_for"] is None for body in submitted) <= 4, submitted
    wait_until_ended(database_url, ids, END_BOUND_SECONDS)
    assert_all_succeeded(database_url, ids)

    runs = ledger_runs(ledger)
    assert len(runs) == len(ids) and {run.attempt for run in runs} == {1}, runs
    at_once = {
        customer: most_at_once([(r.started, r.ended) for r in runs if r.customer == customer])
        for customer in ("acme", "globex")
    }
    assert at_once == {"acme": 2, "globex": 2}, at_once
    assert most_at_once([(r.started, r.ended) for r in runs]) >= 3, "the limit is per customer"
    # The same from the rows: the claim to the recorded end (what a slot is).
    stored = run_intervals(database_url, ids)
    for customer in ("acme", "globex"):
        mine = [
            stored[i]
            for i, body in zip(ids, submitted, strict=True)
            if body["input"]["customer"] == customer
        ]
        assert most_at_once([(started, finished) for _, started, finished, _ in mine]) <= 2


def test_org_max_running_holds_over_two_workers(
    live_client, live_org, flow, tmp_path, database_url
):
    """max_running 3 with an agent without limits, 8 processes free: never 4 at once; 3 do."""
    set_max_running(live_org, 3)
    agent = limited_agent(live_client, live_org, "timed", flow.queue)
    ledger = tmp_path / "ledger.txt"
    submitted = [
        submit(live_client, live_org, agent, {"ledger": str(ledger), "seconds": 0.5, "n": n})
        for n in range(12)
    ]
    ids = [uuid.UUID(body["id"]) for body in submitted]
    assert {body["waiting_for"] for body in submitted} <= {None, "org_max_running"}
    assert sum(body["waiting_for"] is None for body in submitted) <= 3, submitted
    wait_until_ended(database_url, ids, END_BOUND_SECONDS)
    assert_all_succeeded(database_url, ids)
    runs = ledger_runs(ledger)
    assert len(runs) == len(ids), runs
    assert most_at_once([(r.started, r.ended) for r in runs]) == 3
    stored = run_intervals(database_url, ids).values()
    assert most_at_once([(started, finished) for _, started, finished, _ in stored]) <= 3


# ---------------------------------------------------------------------------------------------
# 2. Rate limit


def test_rate_limit_is_a_sliding_window_over_every_worker(
    live_client, live_org, flow, tmp_path, database_url
):
    """rate_limit {"limit": 5, "period_seconds": 1}, 15 submitted at once, 8 processes free: all
    run, and no second holds 7 starts or more (the contract says 5; the issue allows 7)."""
    agent = limited_agent(
        live_client,
        live_org,
        "timed",
        flow.queue,
        rate_limit={"limit": 5, "period_seconds": 1},
    )
    ledger = tmp_path / "ledger.txt"
    submitted = [
        submit(live_client, live_org, agent, {"ledger": str(ledger), "seconds": 0.05, "n": n})
        for n in range(15)
    ]
    ids = [body["id"] for body in submitted]
    assert sum(body["waiting_for"] is None for body in submitted) <= 5, submitted
    assert "agent_rate_limit" in {body["waiting_for"] for body in submitted}, submitted
    wait_until_ended(database_url, [uuid.UUID(i) for i in ids], END_BOUND_SECONDS)
    read_back = [read(live_client, live_org, execution_id) for execution_id in ids]
    assert {body["status"] for body in read_back} == {"succeeded"}, read_back
    starts = [at(body["started_at"]) for body in read_back]
    most = most_starts_within(starts, 1.0)
    spread = (max(starts) - min(starts)).total_seconds()
    note(f"flow: rate_limit 5/s, 15 at once, at most {most} starts in a second", 15, spread)
    assert most < 7, (most, sorted(starts))
    # 15 starts with at most 6 in any second cannot fit in under 2 seconds: the limit acted.
    assert spread >= 2.0, (most, spread)


# ---------------------------------------------------------------------------------------------
# 3. No slot leaks


def test_a_killed_workers_slot_goes_to_the_waiting_execution_within_a_lease_and_a_sweep(
    live_client, live_org, flow, tmp_path, database_url
):
    """concurrency limit 1: A runs on a worker that is SIGKILLed, B waits (agent_concurrency). A
    ends `lost` once its lease runs out, and B starts on the other worker within the lease,
    one sweep and a few flow ticks of the kill, never while A held the slot."""
    queue = own_queue("flow-kill")
    agent = limited_agent(live_client, live_org, "timed", queue, concurrency={"limit": 1})
    ledger = tmp_path / "ledger.txt"
    with (
        celery_worker(
            tmp_path / "a.log", queues=queue, concurrency=1, name="kill-a", env=FLOW_ENV
        ) as first,
        celery_worker(
            tmp_path / "b.log", queues=queue, concurrency=1, name="kill-b", env=FLOW_ENV
        ) as second,
    ):
        a = submit(live_client, live_org, agent, {"ledger": str(ledger), "seconds": 60})
        wait_until_running(database_url, [uuid.UUID(a["id"])])
        b = submit(live_client, live_org, agent, {"ledger": str(ledger), "seconds": 0.2})
        assert b["waiting_for"] == "agent_concurrency", b
        time.sleep(2 * SWEEP_INTERVAL_SECONDS)  # sweeps and ticks come and go: B still waits
        assert read(live_client, live_org, b["id"])["waiting_for"] == "agent_concurrency"
        (worker_name,) = rows(database_url, [uuid.UUID(a["id"])], "worker")[uuid.UUID(a["id"])]
        victim, survivor = (
            (first, "kill-b")
            if worker_name.startswith("kill-a-")
            else (
                second,
                "kill-a",
            )
        )
        kill_worker(victim)
        killed_at = database_now(database_url)
        ended = wait_for_end(live_client, live_org, b["id"], timeout=END_BOUND_SECONDS)
    a_read = read(live_client, live_org, a["id"])
    assert a_read["status"] == "failed" and a_read["error"]["type"] == "lost", a_read
    assert ended["status"] == "succeeded", ended
    b_started = at(ended["started_at"])
    assert b_started >= at(a_read["finished_at"]), (a_read, ended)
    waited = (b_started - killed_at).total_seconds()
    note("flow: worker killed holding the only slot", 2, waited, kill_to_next_start=waited)
    # The lease, one sweep, a few flow ticks and a claim; the rest is slack for a busy machine.
    assert waited <= LEASE_SECONDS + SWEEP_INTERVAL_SECONDS + 3.0, waited
    (b_worker,) = rows(database_url, [uuid.UUID(b["id"])], "worker")[uuid.UUID(b["id"])]
    assert b_worker.startswith(f"{survivor}-{RUN_ID}@"), b_worker


def test_every_end_frees_the_slot_a_timeout_and_the_watchdogs_kill(
    live_client, live_org, flow, tmp_path, database_url
):
    """concurrency limit 1, B waiting behind A each time: A ends `timed_out` (its soft limit),
    then `cancelled` by the watchdog, which records the end and kills its pool process (an
    agent that swallows every interruption). Each time B starts once A has ended."""
    timing_out = limited_agent(
        live_client,
        live_org,
        "ignores_cancel",
        flow.queue,
        concurrency={"limit": 1},
        timeout_seconds=1,
    )
    stubborn = limited_agent(
        live_client, live_org, "stubborn", flow.queue, concurrency={"limit": 1}
    )
    pairs = []
    for agent, how in ((timing_out, "timed_out"), (stubborn, "cancelled")):
        a = submit(live_client, live_org, agent, {"seconds": 60})
        wait_until_running(database_url, [uuid.UUID(a["id"])])
        b = submit(live_client, live_org, agent, {"seconds": 0.1})
        assert b["waiting_for"] == "agent_concurrency", b
        if how == "cancelled":
            cancel = live_client.post(
                f"/api/v1/executions/{a['id']}/cancel", headers=live_org.headers
            )
            assert cancel.status_code in (200, 202), cancel.get_json()
        pairs.append((a["id"], b["id"], how))
    for a_id, b_id, how in pairs:
        b_ended = wait_for_end(live_client, live_org, b_id, timeout=30)
        a_ended = read(live_client, live_org, a_id)
        assert a_ended["status"] == how, a_ended
        assert b_ended["status"] == "succeeded", b_ended
        assert at(b_ended["started_at"]) >= at(a_ended["finished_at"]), (a_ended, b_ended)


def test_a_retry_keeps_its_slot(live_client, live_org, flow, tmp_path, database_url):
    """concurrency limit 1: A fails its first attempt and is retried after a second's backoff;
    B, waiting behind it, starts only once A's retry has ended."""
    agent = limited_agent(
        live_client,
        live_org,
        "flaky",
        flow.queue,
        concurrency={"limit": 1},
        retry={
            "max_retries": 1,
            "backoff_seconds": 1,
            "jitter": False,
            "retry_on": ["runtime_error"],
        },
    )
    a = submit(live_client, live_org, agent, {"succeed_on": 2})
    b = submit(live_client, live_org, agent, {"succeed_on": 1})
    assert b["waiting_for"] == "agent_concurrency", b
    b_ended = wait_for_end(live_client, live_org, b["id"], timeout=30)
    a_ended = read(live_client, live_org, a["id"])
    assert a_ended["status"] == "succeeded" and a_ended["attempts"] == 2, a_ended
    assert b_ended["status"] == "succeeded", b_ended
    assert at(b_ended["started_at"]) >= at(a_ended["finished_at"]), (a_ended, b_ended)


def wait_for_end(client, org, execution_id, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = read(client, org, execution_id)
        if body["status"] in ("succeeded", "failed", "timed_out", "cancelled"):
            return body
        assert time.monotonic() < deadline, f"still {body['status']} after {timeout}s: {body}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# 4. on_limit cancel_running


def test_cancel_running_latest_wins_and_never_two_run(
    app, live_client, live_org, flow, tmp_path, database_url
):
    """concurrency {"limit": 1, "on_limit": "cancel_running"}: A runs; B and C come at once from
    two threads. The one that came first of B and C, and A, end `cancelled` (superseded, naming
    a newer execution); the newest runs and succeeds; no two ran at once."""
    agent = limited_agent(
        live_client,
        live_org,
        "timed",
        flow.queue,
        concurrency={"limit": 1, "on_limit": "cancel_running"},
    )
    ledger = tmp_path / "ledger.txt"
    a = submit(live_client, live_org, agent, {"ledger": str(ledger), "seconds": 30, "n": 0})
    wait_until_running(database_url, [uuid.UUID(a["id"])])
    answers = submit_at_once(
        app,
        live_org,
        agent,
        [{"ledger": str(ledger), "seconds": 1, "n": n} for n in (1, 2)],
    )
    assert [status for status, _ in answers] == [202, 202], answers
    later = [body["id"] for _, body in answers]
    ids = [uuid.UUID(a["id"]), *(uuid.UUID(i) for i in later)]
    wait_until_ended(database_url, ids, 30)
    ended = {
        body["id"]: body for body in (read(live_client, live_org, i) for i in [a["id"], *later])
    }
    won = [i for i in later if ended[i]["status"] == "succeeded"]
    assert len(won) == 1, ended
    (newest,) = won
    (superseded,) = [i for i in later if i != newest]
    for loser, newer in ((a["id"], {newest, superseded}), (superseded, {newest})):
        body = ended[loser]
        assert body["status"] == "cancelled", body
        assert body["error"]["type"] == "superseded", body
        assert any(i in body["error"]["message"] for i in newer), body
    assert ended[a["id"]]["started_at"] is not None
    # Never two running at once: the claim-to-end intervals of those that ran.
    stored = run_intervals(database_url, ids).values()
    intervals = [(started, finished) for _, started, finished, _ in stored if started]
    assert most_at_once(intervals) == 1, stored
    assert [run.execution_id for run in ledger_runs(ledger)] == [newest]


# ---------------------------------------------------------------------------------------------
# 5. on_limit reject


def test_reject_answers_409_and_stores_nothing(app, live_client, live_org, flow, database_url):
    """concurrency {"limit": 1, "on_limit": "reject"}: of submits that come at once, one is
    taken; with it running, submits at once all answer 409 and store nothing; once it ended,
    a submit is taken again."""
    agent = limited_agent(
        live_client,
        live_org,
        "wait_for_cancel",
        flow.queue,
        concurrency={"limit": 1, "on_limit": "reject"},
    )

    def stored() -> int:
        with connect(database_url) as conn:
            return conn.execute(
                "SELECT count(*) FROM executions e JOIN agents a ON a.id = e.agent_id "
                "WHERE a.name = %s AND a.org_id = %s",
                (agent, live_org.id),
            ).fetchone()[0]

    first = submit_at_once(app, live_org, agent, [{"seconds": 30, "n": n} for n in range(6)])
    statuses = sorted(status for status, _ in first)
    assert statuses == [202, 409, 409, 409, 409, 409], first
    assert stored() == 1
    (accepted,) = [body["id"] for status, body in first if status == 202]
    wait_until_running(database_url, [uuid.UUID(accepted)])

    refused = submit_at_once(app, live_org, agent, [{"seconds": 0, "n": n} for n in range(4)])
    assert [status for status, _ in refused] == [409] * 4, refused
    for _, body in refused:
        assert body["code"] == 409 and "reject" in body["message"] and body["hint"], body
    assert stored() == 1

    cancel = live_client.post(f"/api/v1/executions/{accepted}/cancel", headers=live_org.headers)
    assert cancel.status_code in (200, 202), cancel.get_json()
    assert wait_for_end(live_client, live_org, accepted, timeout=20)["status"] == "cancelled"
    again = submit(live_client, live_org, agent, {"seconds": 0})
    assert wait_for_end(live_client, live_org, again["id"], timeout=20)["status"] == "succeeded"
    assert stored() == 2


# ---------------------------------------------------------------------------------------------
# 6. waiting_for


def test_waiting_for_shows_org_max_running_until_the_slot_frees(
    live_client, live_org, flow, database_url
):
    set_max_running(live_org, 1)
    agent = limited_agent(live_client, live_org, "wait_for_cancel", flow.queue)
    first = submit(live_client, live_org, agent, {"seconds": 30})
    assert first["waiting_for"] is None, first
    wait_until_running(database_url, [uuid.UUID(first["id"])])
    assert read(live_client, live_org, first["id"])["waiting_for"] is None

    second = submit(live_client, live_org, agent, {"seconds": 0.2})
    assert second["status"] == "queued" and second["waiting_for"] == "org_max_running", second
    time.sleep(1.0)  # flow ticks come and go: it still waits, and says why
    body = read(live_client, live_org, second["id"])
    assert body["status"] == "queued" and body["waiting_for"] == "org_max_running", body
    listed = live_client.get(f"/api/v1/executions?agent={agent}", headers=live_org.headers)
    assert {row["id"]: row["waiting_for"] for row in listed.get_json()} == {
        first["id"]: None,
        second["id"]: "org_max_running",
    }

    cancel = live_client.post(f"/api/v1/executions/{first['id']}/cancel", headers=live_org.headers)
    assert cancel.status_code in (200, 202), cancel.get_json()
    ended = wait_for_end(live_client, live_org, second["id"], timeout=20)
    assert ended["status"] == "succeeded" and ended["waiting_for"] is None, ended
    assert read(live_client, live_org, first["id"])["status"] == "cancelled"


# ---------------------------------------------------------------------------------------------
# 7. Fairness


def test_a_backlog_in_one_org_delays_another_by_a_handful(
    live_client, live_org, other_live_org, flow, database_url
):
    """Fair window 4: org A submits a batch of 200 of a short agent, then org B submits 5 on the
    same queue. B's all end before A's last 100 do."""
    backlog = limited_agent(live_client, live_org, "echo", flow.queue)
    newcomer = limited_agent(live_client, other_live_org, "echo", flow.queue)
    response = live_client.post(
        f"/api/v1/agents/{backlog}/executions/batch",
        json={"items": [{"input": {"n": n}} for n in range(200)]},
        headers=live_org.headers,
    )
    assert response.status_code == 202, response.get_json()
    a_ids = [uuid.UUID(i) for i in response.get_json()["ids"]]
    with connect(database_url) as conn:
        (held,) = conn.execute(
            "SELECT count(*) FROM executions WHERE id = ANY(%s) AND waiting_for = 'queue'",
            (a_ids,),
        ).fetchone()
    assert held >= 100, f"the fair window held back only {held} of 200"
    b_ids = [
        uuid.UUID(submit(live_client, other_live_org, newcomer, {"n": n})["id"]) for n in range(5)
    ]
    wait_until_ended(database_url, a_ids + b_ids, 90)
    assert_all_succeeded(database_url, a_ids + b_ids)
    a_rows = rows(database_url, a_ids, "queued_at, started_at, finished_at").values()
    b_rows = rows(database_url, b_ids, "queued_at, started_at, finished_at").values()
    a_finished = sorted(finished for _, _, finished in a_rows)
    b_last = max(finished for _, _, finished in b_rows)
    b_wait = max((started - queued).total_seconds() for queued, started, _ in b_rows)
    a_backlog = (a_finished[-1] - min(queued for queued, _, _ in a_rows)).total_seconds()
    # B's last ended before A's 100th did: the backlog ahead of B was a handful, not 200.
    a_ahead = sum(1 for finished in a_finished if finished < b_last)
    note(
        f"flow: 5 behind another org's 200, {a_ahead} of the 200 ended before the 5 had",
        205,
        a_backlog,
        b_longest_wait=b_wait,
        a_backlog=a_backlog,
    )
    assert b_last < a_finished[99], (a_ahead, b_wait, a_backlog)


# ---------------------------------------------------------------------------------------------
# 8. Batches and chain steps under the limits


def submit_batch(client, org, agent: str, items: list[dict]) -> list[str]:
    response = client.post(
        f"/api/v1/agents/{agent}/executions/batch", json={"items": items}, headers=org.headers
    )
    assert response.status_code == 202, response.get_json()
    return response.get_json()["ids"]


def test_a_batch_runs_first_in_first_out_within_a_key(
    live_client, live_org, flow, tmp_path, database_url
):
    """concurrency limit 1 (`queue`): a batch's items of one key run one at a time, in item
    order ("first in first out within a key")."""
    agent = limited_agent(live_client, live_org, "timed", flow.queue, concurrency={"limit": 1})
    ledger = tmp_path / "ledger.txt"
    ids = submit_batch(
        live_client,
        live_org,
        agent,
        [{"input": {"ledger": str(ledger), "seconds": 0.05, "n": n}} for n in range(6)],
    )
    wait_until_ended(database_url, [uuid.UUID(i) for i in ids], END_BOUND_SECONDS)
    assert_all_succeeded(database_url, ids)
    runs = ledger_runs(ledger)
    assert most_at_once([(run.started, run.ended) for run in runs]) == 1
    ran = [run.execution_id for run in runs]
    assert ran == ids, [ids.index(i) for i in ran]


def test_chain_steps_obey_org_max_running(live_client, live_org, flow, tmp_path, database_url):
    """max_running 1, one execution running: a chain's step waits (org_max_running) until it
    ends, then runs."""
    set_max_running(live_org, 1)
    holder = limited_agent(live_client, live_org, "wait_for_cancel", flow.queue)
    step_agent = limited_agent(live_client, live_org, "timed", flow.queue)
    running = submit(live_client, live_org, holder, {"seconds": 30})
    try:
        wait_until_running(database_url, [uuid.UUID(running["id"])])
        chain = f"chain-{uuid.uuid4().hex[:8]}"
        created = live_client.post(
            "/api/v1/chains",
            json={
                "name": chain,
                "input_schema": {"type": "object"},
                "steps": [{"name": "only", "agent": step_agent}],
            },
            headers=live_org.headers,
        )
        assert created.status_code == 201, created.get_json()
        ledger = tmp_path / "ledger.txt"
        started = live_client.post(
            f"/api/v1/chains/{chain}/executions",
            json={"input": {"ledger": str(ledger), "seconds": 0.1}},
            headers=live_org.headers,
        )
        assert started.status_code == 202, started.get_json()
        chain_execution = started.get_json()["id"]
        time.sleep(3.0)
        assert ledger_runs(ledger) == [], "the step ran while max_running was taken"
    finally:
        # Not left running for the module's other tests.
        live_client.post(f"/api/v1/executions/{running['id']}/cancel", headers=live_org.headers)

    def chain_status():
        body = live_client.get(
            f"/api/v1/chain-executions/{chain_execution}", headers=live_org.headers
        ).get_json()
        return body["status"] if body["status"] in ("succeeded", "failed", "cancelled") else None

    assert wait_until(chain_status, timeout=20) == "succeeded"


# ---------------------------------------------------------------------------------------------
# 3, continued: the broker flushed and PostgreSQL restarted, on a private stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    with private_stack(tmp_path_factory.mktemp("flow-storage"), "flow") as opened:
        yield opened


def stack_limited(stack: Stack, queue: str, **limits) -> str:
    def post(body: dict) -> tuple[int, Any]:
        reply = stack.api.call("POST", "/api/v1/agents", body)
        return reply.status, reply.body

    return define_limited(post, "timed", queue, **limits)


def test_a_slot_let_out_before_a_broker_flush_is_not_lost(stack, tmp_path):
    """concurrency limit 1: A is let out (queued, its message in the broker, no worker serves
    its queue yet), B waits for A's slot. FLUSHALL loses A's message; once a worker serves the
    queue, A runs (republished) and then B: the slot did not leak with the message."""
    wait_until_healthy(stack)
    queue = "flow-flushed"
    agent = stack_limited(stack, queue, concurrency={"limit": 1})
    ledger = tmp_path / "ledger.txt"
    first = stack.api.submit(agent, {"ledger": str(ledger), "seconds": 0.3, "n": 0})
    second = stack.api.submit(agent, {"ledger": str(ledger), "seconds": 0.3, "n": 1})
    assert first.status == 202 and first.body["waiting_for"] is None, first.body
    assert second.status == 202 and second.body["waiting_for"] == "agent_concurrency", second.body
    ids = [uuid.UUID(first.body["id"]), uuid.UUID(second.body["id"])]
    assert stack.count(ids[:1], "waiting_for IS NULL AND dispatched_at IS NOT NULL") == 1
    broker = redis.Redis.from_url(stack.redis.url)
    assert broker.dbsize() > 0
    broker.flushall()
    with celery_worker(
        tmp_path / "flushed.log", queues=queue, concurrency=2, name="flow-flushed", env=stack.env
    ):
        serving = time.monotonic()
        ended_after = wait_until_ended(stack.database_url, ids, 30)
    assert stack.count(ids, "status = 'succeeded' AND attempt = 1") == 2, stack.sql(
        "SELECT id, status, waiting_for, attempt FROM executions WHERE id = ANY(%s)", (ids,)
    )
    runs = ledger_runs(ledger)
    assert [run.execution_id for run in runs] == [str(i) for i in ids], runs
    assert most_at_once([(run.started, run.ended) for run in runs]) == 1
    note("flow: broker flushed with a slot let out", 2, ended_after)
    assert ended_after < 15, (ended_after, time.monotonic() - serving)


def test_a_slot_frees_when_its_execution_ended_while_postgresql_was_down(stack, tmp_path):
    """concurrency limit 1: A runs, B and C wait. PostgreSQL stops for 3 s, during which A's
    work ends; once it is back A's end is recorded, and B then C run, one at a time."""
    wait_until_healthy(stack)
    agent = stack_limited(stack, "default", concurrency={"limit": 1})
    ledger = tmp_path / "ledger.txt"
    replies = [
        stack.api.submit(agent, {"ledger": str(ledger), "seconds": seconds, "n": n})
        for n, seconds in enumerate((2.0, 0.3, 0.3))
    ]
    assert [reply.status for reply in replies] == [202] * 3, replies
    assert [reply.body["waiting_for"] for reply in replies] == [
        None,
        "agent_concurrency",
        "agent_concurrency",
    ]
    ids = [uuid.UUID(reply.body["id"]) for reply in replies]
    wait_until(lambda: stack.count(ids[:1], "status = 'running'") == 1, timeout=20)
    stack.postgres.stop()
    try:
        time.sleep(3)
    finally:
        stack.start_postgres()
    recovery = wait_until_ended(stack.database_url, ids, 60)
    note("flow: postgresql restarted with a slot held", 3, recovery)
    assert stack.count(ids, "status = 'succeeded'") == 3, stack.sql(
        "SELECT id, status, waiting_for, error FROM executions WHERE id = ANY(%s)", (ids,)
    )
    runs = ledger_runs(ledger)
    assert [run.execution_id for run in runs] == [str(i) for i in ids], runs
    assert most_at_once([(run.started, run.ended) for run in runs]) == 1
    stored = stack.sql("SELECT started_at, finished_at FROM executions WHERE id = ANY(%s)", (ids,))
    assert most_at_once(stored) == 1, stored


# ---------------------------------------------------------------------------------------------
# Where the gates break the contract: these fail on main at 271adb5 (see each docstring)


def test_rate_limit_counts_a_start_committed_while_the_gates_read(
    live_client, live_org, flow, database_url, monkeypatch
):
    """rate_limit {"limit": 2, "period_seconds": 60}: A and B are let out (on a queue no worker
    serves), C waits. A release that reads the window while A's claim commits must still find
    two in it: A started or A pending, never neither.

    The 5-per-second test meets this race now and then (6 starts in a second in 2 of 15 rounds
    tried; it allows up to 6, as the issue does); here it is pinned down: a real claim of A
    (the worker's statement) is committed from another connection right after the release's
    first read of the rate window, and the release runs as beat's flow tick runs it."""
    from app.executions import gates, store

    agent = limited_agent(
        live_client,
        live_org,
        "timed",
        own_queue("flow-idle"),
        rate_limit={"limit": 2, "period_seconds": 60},
    )
    a, b, c = (submit(live_client, live_org, agent, {"ledger": "/dev/null"}) for _ in range(3))
    assert [a["waiting_for"], b["waiting_for"], c["waiting_for"]] == [
        None,
        None,
        "agent_rate_limit",
    ]
    real_driver = gates.driver
    claimed = []

    class ClaimAfterTheWindowsFirstRead:
        def __init__(self, pg):
            self._pg = pg

        def __getattr__(self, name):
            return getattr(self._pg, name)

        def execute(self, query, *args, **kwargs):
            result = self._pg.execute(query, *args, **kwargs)
            if not claimed and "started_at > now()" in str(query):
                with db.hot() as other:
                    claimed.append(store.claim(other, uuid.UUID(a["id"]), "probe", 30.0)[0])
            return result

    monkeypatch.setattr(
        gates, "driver", lambda conn: ClaimAfterTheWindowsFirstRead(real_driver(conn))
    )
    with db.begin() as conn:
        gates.lock(conn, live_org.id)
        released = gates.release(conn, live_org.id)
    monkeypatch.undo()
    assert claimed and claimed[0] is not None, "A was not claimed during the release"
    let_out = {str(out.execution_id) for out in released.let_out}
    assert c["id"] not in let_out, "C was let out with A started and B pending: 3 in the window"


def test_retried_attempts_count_against_the_rate_limit(live_client, live_org, flow, database_url):
    """rate_limit {"limit": 2, "period_seconds": 10}, an agent that fails its first attempt and
    is retried at once: at most 2 attempts start in 10 s (an outside API's "N calls per S
    seconds": a retried attempt calls it again)."""
    agent = limited_agent(
        live_client,
        live_org,
        "flaky",
        flow.queue,
        rate_limit={"limit": 2, "period_seconds": 10},
        retry={"max_retries": 1, "backoff_seconds": 0, "retry_on": ["runtime_error"]},
    )
    ids = [submit(live_client, live_org, agent, {"succeed_on": 2})["id"] for _ in range(2)]
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        with connect(database_url) as conn:
            starts = [
                row[0]
                for row in conn.execute(
                    # An attempt put back for a retry is in both tables: count it once.
                    "SELECT started_at FROM execution_attempts WHERE execution_id = ANY(%s) "
                    "UNION ALL SELECT started_at FROM executions e "
                    "WHERE id = ANY(%s) AND started_at IS NOT NULL AND NOT EXISTS ("
                    "SELECT 1 FROM execution_attempts a "
                    "WHERE a.execution_id = e.id AND a.attempt = e.attempt)",
                    (ids, ids),
                ).fetchall()
            ]
        assert len(starts) <= 2, f"{len(starts)} attempts started in under 10 s: {starts}"
        time.sleep(0.2)


def test_a_deep_blocked_backlog_does_not_hide_an_execution_that_may_start(
    live_client, live_org, flow, database_url
):
    """Agent P (concurrency limit 1) has one execution let out and over 2,000 more waiting at
    priority 9 for its slot; agent Q (concurrency limit 1) of the same organization has nothing
    running. Q's new execution may start at once: it must not wait behind P's backlog, which
    cannot move (on a queue no worker serves, as with a long-running P)."""
    queue = own_queue("flow-idle")
    blocked = limited_agent(live_client, live_org, "timed", queue, concurrency={"limit": 1})
    free = limited_agent(live_client, live_org, "timed", queue, concurrency={"limit": 1})
    for size in (1000, 1000, 2):
        submit_batch(
            live_client,
            live_org,
            blocked,
            [{"input": {"ledger": "/dev/null"}, "priority": 9} for _ in range(size)],
        )
    body = submit(live_client, live_org, free, {"ledger": "/dev/null"})
    time.sleep(1.0)  # flow ticks come and go
    read_back = read(live_client, live_org, body["id"])
    assert (body["waiting_for"], read_back["waiting_for"]) == (None, None), read_back


def test_cancel_running_in_a_batch_the_last_item_of_a_key_wins(
    live_client, live_org, flow, database_url
):
    """concurrency {"limit": 1, "on_limit": "cancel_running"}: of a batch's items of one key,
    the last is the newest; the earlier ones are superseded by it as the batch is stored (on a
    queue no worker serves, so nothing has run)."""
    agent = limited_agent(
        live_client,
        live_org,
        "timed",
        own_queue("flow-idle"),
        concurrency={"limit": 1, "on_limit": "cancel_running"},
    )
    ids = submit_batch(
        live_client, live_org, agent, [{"input": {"ledger": "/dev/null", "n": n}} for n in range(3)]
    )
    stored = rows(database_url, [uuid.UUID(i) for i in ids], "status, waiting_for, error")
    by_item = [stored[uuid.UUID(i)] for i in ids]
    assert [status for status, _, _ in by_item] == ["cancelled", "cancelled", "queued"], by_item
    for _, _, error in by_item[:2]:
        assert error["type"] == "superseded" and ids[2] in error["message"], by_item
