"""Notifications end to end: real workers and a real beat deliver events, signed, to a receiver
on 127.0.0.2 (listed in RUNYARD_HTTP_ALLOW_HOSTS by tests/conftest.py) that checks every
signature. Retries are made short by RUNYARD_NOTIFY_FIRST_RETRY_SECONDS, and the 24 hour
window by RUNYARD_NOTIFY_RETRY_WINDOW_SECONDS. The agents and the delivery tasks go to a queue
of this module's own, so the session's worker (default settings) takes no part."""

import hashlib
import hmac
import json
import time
import uuid

import pytest
from sqlalchemy import text

from tests.beat import BeatProcess
from tests.conftest import celery_worker, wait_for, wait_until
from tests.local_http import Reply, local_server
from tests.workers.test_runs import python_agent as define_agent
from tests.workers.test_runs import run

pytestmark = pytest.mark.worker

WINDOW_SECONDS = 6
QUEUE = f"notify-{uuid.uuid4().hex[:8]}"
ENV = {
    "RUNYARD_NOTIFY_QUEUE": QUEUE,
    "RUNYARD_NOTIFY_FIRST_RETRY_SECONDS": "0.2",
    "RUNYARD_NOTIFY_RETRY_WINDOW_SECONDS": str(WINDOW_SECONDS),
    "RUNYARD_NOTIFY_POLL_SECONDS": "0.2",
}


@pytest.fixture(scope="module")
def processes(app, tmp_path_factory):
    """A worker and a beat with short notification retries."""
    directory = tmp_path_factory.mktemp("notify")
    with celery_worker(directory / "worker.log", queues=QUEUE, name="notify", env=ENV):
        beat = BeatProcess(directory, "beat", env=ENV)
        try:
            beat.wait_ready()
            yield
        finally:
            beat.stop()


@pytest.fixture
def client(app, processes):
    return app.test_client()


@pytest.fixture
def receiver():
    with local_server(host="127.0.0.2") as server:
        server.route("/hook", Reply(200, {"ok": True}))
        yield server


def python_agent(client, org, name, function):
    return define_agent(client, org, name, function, queue=QUEUE)


def verified(secret, seen):
    """The event a request carried, once its signature checks out (as README shows)."""
    stamp, v1 = (part.split("=", 1)[1] for part in seen.headers["Runyard-Signature"].split(","))
    expected = hmac.new(secret.encode(), f"{stamp}.".encode() + seen.body, hashlib.sha256)
    assert hmac.compare_digest(expected.hexdigest(), v1), "bad signature"
    assert abs(time.time() - int(stamp)) < 60
    assert seen.headers["Content-Type"] == "application/json"
    event = json.loads(seen.body)
    assert seen.headers["Runyard-Event-Id"] == event["id"]
    return event


def subscribe(client, org, receiver, events, **extra):
    response = client.post(
        "/api/v1/notifications",
        json={"name": f"n{time.monotonic_ns()}", "url": receiver.url("/hook"), "events": events}
        | extra,
        headers=org.headers,
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def deliveries(client, org, notification):
    response = client.get(
        f"/api/v1/notifications/{notification['id']}/deliveries", headers=org.headers
    )
    assert response.status_code == 200
    return response.get_json()


def test_executions_produce_exactly_the_subscribed_events_signed(client, live_org, receiver):
    python_agent(client, live_org, "echo", "echo")
    python_agent(client, live_org, "boom", "boom")
    hook = subscribe(client, live_org, receiver, ["execution.failed", "execution.succeeded"])
    only_failures = subscribe(
        client, live_org, receiver, ["execution.failed"], filter={"agents": ["boom"]}
    )
    ok = run(client, live_org, "echo", {"n": 1})
    bad = run(client, live_org, "boom")
    assert wait_for(client, live_org, ok)["status"] == "succeeded"
    failed = wait_for(client, live_org, bad)
    assert failed["status"] == "failed"
    # One each for `hook`, the failure again for `only_failures`.
    seen = wait_until(lambda: len(receiver.seen("/hook")) >= 3 and receiver.seen("/hook"))
    time.sleep(0.5)  # nothing more arrives
    seen = receiver.seen("/hook")
    assert len(seen) == 3
    by_secret = {hook["secret"]: [], only_failures["secret"]: []}
    for request in seen:
        for secret, events in by_secret.items():
            try:
                events.append(verified(secret, request))
            except AssertionError:
                continue
    assert sorted((e["type"], e["data"]["id"]) for e in by_secret[hook["secret"]]) == sorted(
        [("execution.succeeded", ok), ("execution.failed", bad)]
    )
    [filtered] = by_secret[only_failures["secret"]]
    assert filtered["type"] == "execution.failed"
    # `data` is the execution as GET shows it.
    assert filtered["data"] == failed
    log = deliveries(client, live_org, hook)
    assert {entry["status"] for entry in log} == {"delivered"}
    assert all(entry["attempts"] == 1 and entry["last_status_code"] == 200 for entry in log)


def test_a_receiver_that_is_down_for_a_while_gets_every_event(client, live_org, receiver):
    python_agent(client, live_org, "echo", "echo")
    hook = subscribe(client, live_org, receiver, ["execution.succeeded"])
    receiver.route("/hook", *[Reply(503, "down")] * 8, Reply(200, {"ok": True}))
    ids = [run(client, live_org, "echo", {"n": n}) for n in range(4)]
    for execution_id in ids:
        wait_for(client, live_org, execution_id)

    def all_delivered():
        log = deliveries(client, live_org, hook)
        return len(log) == 4 and all(entry["status"] == "delivered" for entry in log) and log

    log = wait_until(all_delivered, timeout=WINDOW_SECONDS)
    assert any(entry["attempts"] > 1 for entry in log)
    delivered = {
        verified(hook["secret"], seen)["data"]["id"]
        for seen in receiver.seen("/hook")
        if seen.headers.get("Runyard-Signature")
    }
    assert delivered == set(ids)


def test_after_the_window_an_event_is_failed_and_redeliver_sends_it_again(
    client, live_org, receiver
):
    python_agent(client, live_org, "echo", "echo")
    hook = subscribe(client, live_org, receiver, ["execution.succeeded"])
    receiver.route("/hook", Reply(503, "still down"))
    wait_for(client, live_org, run(client, live_org, "echo"))

    def failed():
        log = deliveries(client, live_org, hook)
        return log and log[0]["status"] == "failed" and log[0]

    entry = wait_until(failed, timeout=WINDOW_SECONDS + 10)
    assert entry["attempts"] > 2
    assert entry["last_status_code"] == 503
    assert entry["last_error"] == "HTTP 503: still down"
    assert entry["next_attempt_at"] is None
    sent_before = len(receiver.seen("/hook"))
    receiver.route("/hook", Reply(204))
    response = client.post(
        f"/api/v1/notifications/{hook['id']}/deliveries/{entry['event_id']}/redeliver",
        headers=live_org.headers,
    )
    assert response.status_code == 202
    wait_until(lambda: deliveries(client, live_org, hook)[0]["status"] == "delivered")
    again = receiver.seen("/hook")[sent_before:]
    assert [verified(hook["secret"], seen)["id"] for seen in again] == [entry["event_id"]]


def test_a_name_the_guard_refuses_fails_the_delivery_with_why(client, live_org, receiver):
    # A name passes at creation (it is checked on what it resolves to, at each delivery):
    # localhost resolves to a loopback address not in the allow-list.
    python_agent(client, live_org, "echo", "echo")
    response = client.post(
        "/api/v1/notifications",
        json={
            "name": "local",
            "url": f"http://localhost:{receiver.port}/hook",
            "events": ["execution.succeeded"],
        },
        headers=live_org.headers,
    )
    assert response.status_code == 201
    hook = response.get_json()
    wait_for(client, live_org, run(client, live_org, "echo"))
    entry = wait_until(
        lambda: (
            (log := deliveries(client, live_org, hook)) and log[0]["status"] == "failed" and log[0]
        )
    )
    assert entry["attempts"] == 1 and entry["last_status_code"] is None
    assert "loopback address" in entry["last_error"]
    assert "RUNYARD_HTTP_ALLOW_HOSTS" in entry["last_error"]
    assert receiver.seen("/hook") == []


def test_a_quota_refusal_is_notified_once_a_minute(client, live_org, receiver):
    from app.db import db

    python_agent(client, live_org, "echo", "echo")
    hook = subscribe(client, live_org, receiver, ["quota.exceeded"])
    with db.engine.begin() as conn:
        conn.execute(
            text("UPDATE organizations SET submit_rate = 0.01, submit_burst = 1 WHERE id = :id"),
            {"id": live_org.id},
        )
    codes = [
        client.post(
            "/api/v1/agents/echo/executions", json={"input": {}}, headers=live_org.headers
        ).status_code
        for _ in range(4)
    ]
    assert codes == [202, 429, 429, 429]
    seen = wait_until(lambda: receiver.seen("/hook"))
    time.sleep(0.5)
    assert len(receiver.seen("/hook")) == 1
    event = verified(hook["secret"], seen[0])
    assert event["type"] == "quota.exceeded"
    assert event["data"]["limit"] == "submit_rate"
    assert event["data"]["retry_after"] >= 1


def test_a_chain_end_is_notified_with_the_chain_execution(client, live_org, receiver):
    python_agent(client, live_org, "echo", "echo")
    hook = subscribe(client, live_org, receiver, ["chain.succeeded", "chain.failed"])
    chain = {"name": "pipeline", "steps": [{"name": "one", "agent": "echo"}]}
    assert client.post("/api/v1/chains", json=chain, headers=live_org.headers).status_code == 201
    started = client.post(
        "/api/v1/chains/pipeline/executions", json={"input": {}}, headers=live_org.headers
    ).get_json()
    seen = wait_until(lambda: receiver.seen("/hook"), timeout=20)
    event = verified(hook["secret"], seen[0])
    assert event["type"] == "chain.succeeded"
    assert event["data"]["id"] == started["id"]
    assert event["data"]["status"] == "succeeded"


def test_a_schedule_that_pauses_itself_is_notified(client, live_org, receiver):
    python_agent(client, live_org, "boom", "boom")
    hook = subscribe(client, live_org, receiver, ["schedule.paused"])
    schedule = {
        "name": "every-second",
        "target": {"agent": "boom"},
        "cron": "* * * * * *",
        "pause_after_failures": 1,
    }
    response = client.post("/api/v1/schedules", json=schedule, headers=live_org.headers)
    assert response.status_code == 201, response.get_json()
    seen = wait_until(lambda: receiver.seen("/hook"), timeout=20)
    event = verified(hook["secret"], seen[0])
    assert event["type"] == "schedule.paused"
    assert event["data"]["name"] == "every-second"
    assert event["data"]["enabled"] is False
    assert event["data"]["paused_reason"].startswith("paused itself after")
