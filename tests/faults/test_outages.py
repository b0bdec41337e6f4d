"""Outages as a client sees them: the broker down, then PostgreSQL down, and both back, with
the same API and worker processes throughout (no restart)."""

import threading
import time
import uuid

import pytest

from tests.faults.harness import REPORTS, FaultReport, wait_until_ended
from tests.faults.private import private_stack, wait_until_healthy

pytestmark = pytest.mark.worker

# The contract: a database outage answers 503 "within 10 s, never a hang past it".
DATABASE_DOWN_BOUND_SECONDS = 10.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with private_stack(tmp_path_factory.mktemp("outages"), "outages") as opened:
        yield opened


def assert_error_shape(body: dict, code: int) -> None:
    assert body["code"] == code and body["status"] and body["message"], body
    assert isinstance(body["errors"], dict) and body["hint"], body


def test_broker_down_accepts_submits_and_runs_them_once_it_is_back(stack):
    wait_until_healthy(stack)
    stack.broker.stop()
    injected = time.monotonic()
    try:
        submitted = stack.api.submit("ledger", {"ledger": str(stack.ledger), "n": 1})
        ready = stack.api.call("GET", "/readyz")
        assert submitted.status == 202, submitted.body
        assert submitted.seconds < 2.0, f"the submit waited {submitted.seconds:.2f}s on the broker"
        assert ready.status == 503, ready.body
        assert_error_shape(ready.body, 503)
        assert "broker" in ready.body["message"] and "database" not in ready.body["message"]
        assert ready.body["errors"]["database"] == "ok"
        assert ready.body["errors"]["broker"].startswith("error")
        assert ready.seconds < DATABASE_DOWN_BOUND_SECONDS
        execution_id = uuid.UUID(submitted.body["id"])
        time.sleep(1)
        assert stack.count([execution_id], "status = 'queued'") == 1
    finally:
        stack.broker.start()
    back = time.monotonic()
    wait_until_ended(stack.database_url, [execution_id], timeout=30)
    ran = time.monotonic() - back
    read = stack.api.call("GET", f"/api/v1/executions/{execution_id}")
    assert read.status == 200 and read.body["status"] == "succeeded", read.body
    assert read.body["attempts"] == 1
    REPORTS.append(
        FaultReport(
            f"broker ({stack.broker.name}) down: submit answered 202 while it was",
            accepted=1,
            lost=0,
            duplicated=0,
            reruns=0,
            recovery_seconds=time.monotonic() - injected,
            timings={
                "submit": submitted.seconds,
                "readyz": ready.seconds,
                "ran_after_broker_back": ran,
            },
        )
    )


def test_database_down_answers_503_fast_and_recovers_without_a_restart(stack):
    wait_until_healthy(stack)
    done = stack.api.submit("ledger", {"ledger": str(stack.ledger), "n": 2})
    assert done.status == 202
    execution_id = done.body["id"]
    stack.postgres.stop()
    injected = time.monotonic()
    try:
        submit = stack.api.submit("ledger", {"ledger": str(stack.ledger), "n": 3})
        read = stack.api.call("GET", f"/api/v1/executions/{execution_id}")
        listing = stack.api.call("GET", "/api/v1/executions")
        event = stack.api.call("POST", "/api/v1/events", {"name": "outage", "id": "during"})
        ready = stack.api.call("GET", "/readyz")
        for reply in (submit, read, listing, event, ready):
            assert reply.status == 503, reply.body
            assert_error_shape(reply.body, 503)
            assert reply.seconds < DATABASE_DOWN_BOUND_SECONDS, reply.seconds
        assert "database" in submit.body["message"] and "database" in read.body["message"]
        assert "database" in ready.body["message"] and "broker" not in ready.body["message"]
        assert ready.body["errors"]["broker"] == "ok"
    finally:
        stack.start_postgres()
    back = time.monotonic()
    # The first requests may still meet connections that died with the server; a bounded few.
    failures = 0
    while (
        submitted := stack.api.submit("ledger", {"ledger": str(stack.ledger), "n": 4})
    ).status != 202:
        failures += 1
        assert submitted.status == 503 and failures <= 3, submitted.body
    reread = stack.api.call("GET", f"/api/v1/executions/{execution_id}")
    assert reread.status == 200, reread.body
    # The event refused during the outage left nothing behind: its id is new.
    event = stack.api.call("POST", "/api/v1/events", {"name": "outage", "id": "during"})
    assert event.status == 202 and event.body["duplicate"] is False, event.body
    assert stack.api.call("GET", "/readyz").status == 200
    new_id = uuid.UUID(submitted.body["id"])
    wait_until_ended(stack.database_url, [new_id], timeout=30)
    assert stack.count([new_id], "status = 'succeeded'") == 1
    REPORTS.append(
        FaultReport(
            "database down: 503 within the bound, then served again",
            accepted=1,
            lost=0,
            duplicated=0,
            reruns=0,
            recovery_seconds=time.monotonic() - back,
            details={"503s_after_database_back": failures},
            timings={
                "submit_503": submit.seconds,
                "read_503": read.seconds,
                "list_503": listing.seconds,
                "readyz_503": ready.seconds,
                "down_for": back - injected,
            },
        )
    )


def test_an_event_sent_across_a_database_restart_is_delivered_or_refused_never_lost(stack):
    """Executions wait for events; PostgreSQL restarts while a sender posts one event per
    waiter (retrying each refused one, as a sender does). Every event answered 202 resumed its
    waiter, and every waiter ends with its own event's data."""
    wait_until_healthy(stack)
    created = stack.api.call(
        "POST",
        "/api/v1/agents",
        {
            "name": "waiter",
            "runtime": {"type": "python", "entrypoint": "tests.agents:waits_for_event"},
        },
    )
    assert created.status == 201, created.body
    waiters = []
    for n in range(5):
        reply = stack.api.submit("waiter", {"event": "restart.go", "match": {"n": n}})
        assert reply.status == 202, reply.body
        waiters.append(uuid.UUID(reply.body["id"]))
    deadline = time.monotonic() + 30
    while stack.count(waiters, "status = 'waiting'") < len(waiters):
        assert time.monotonic() < deadline, "the waiters never waited"
        time.sleep(0.1)
    answers: dict[int, list[int]] = {n: [] for n in range(5)}

    def send_all() -> None:
        for n in range(5):
            while True:
                reply = stack.api.call(
                    "POST",
                    "/api/v1/events",
                    {"name": "restart.go", "data": {"n": n}, "id": f"restart-{n}"},
                    timeout=15,
                )
                answers[n].append(reply.status)
                if reply.status == 202:
                    break
                assert reply.status == 503, reply.body
                time.sleep(0.2)
            time.sleep(0.3)

    sender = threading.Thread(target=send_all)
    sender.start()
    stack.postgres.stop()
    time.sleep(1.5)
    stack.start_postgres()
    sender.join(timeout=60)
    assert not sender.is_alive()
    wait_until_ended(stack.database_url, waiters, timeout=30)
    for n, execution_id in enumerate(waiters):
        read = stack.api.call("GET", f"/api/v1/executions/{execution_id}")
        assert read.body["status"] == "succeeded", read.body
        assert read.body["output"] == {"data": {"n": n}}, read.body
    accepted = stack.sql("SELECT count(*) FROM events WHERE name = 'restart.go'")[0][0]
    assert accepted == 5, answers
    REPORTS.append(
        FaultReport(
            "events across a database restart: each accepted once and delivered",
            accepted=5,
            lost=0,
            duplicated=0,
            reruns=0,
            recovery_seconds=0.0,
            details={"refused_503": sum(s.count(503) for s in answers.values())},
        )
    )
