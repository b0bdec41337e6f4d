"""Idempotency-Key with committed rows and a real worker: 50 concurrent submits with one key, the
wait for a key that is still in use, and publishing only after the request's commit."""

import contextlib
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from sqlalchemy import text

from app.db import db
from tests.conftest import wait_for, wait_until

pytestmark = pytest.mark.worker

ECHO = {
    "name": "echo",
    "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
    "input_schema": {"type": "object", "required": ["text"]},
}
SUBMIT = "/api/v1/agents/echo/executions"


def keyed(org, key):
    return {**org.headers, "Idempotency-Key": key}


def make_agent(client, org, **extra):
    response = client.post("/api/v1/agents", json={**ECHO, **extra}, headers=org.headers)
    assert response.status_code == 201, response.get_json()


def scalar(sql, **params):
    with db.engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


@contextlib.contextmanager
def deferred_trigger(body: str, tables=("executions",)):
    """A constraint trigger run at COMMIT for rows whose input holds a marker: PostgreSQL
    itself slows or refuses the commit of the request under test. Dropped at the end."""
    name = f"idem_{uuid.uuid4().hex[:10]}"
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN {body} RETURN NULL; END $$"
        )
        for table in tables:
            conn.exec_driver_sql(
                f"CREATE CONSTRAINT TRIGGER {name} AFTER INSERT ON {table} "
                f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {name}()"
            )
    try:
        yield
    finally:
        with db.engine.begin() as conn:
            for table in tables:
                conn.exec_driver_sql(f"DROP TRIGGER {name} ON {table}")
            conn.exec_driver_sql(f"DROP FUNCTION {name}()")


def queued_messages(queue: str) -> int:
    """Messages waiting in a Redis queue, over kombu's per-priority lists."""
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    return sum(client.llen(name) for name in [queue, *(f"{queue}:{n}" for n in range(1, 10))])


def test_fifty_concurrent_submits_with_one_key_give_one_execution(app, live_client, live_org):
    make_agent(live_client, live_org)
    clients = 50
    start = threading.Barrier(clients)

    def send(_):
        client = app.test_client()
        start.wait(timeout=30)
        response = client.post(
            SUBMIT, json={"input": {"text": "once"}}, headers=keyed(live_org, "fifty")
        )
        return response.status_code, response.get_json(), response.headers

    began = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(send, range(clients)))
    elapsed = time.monotonic() - began
    assert [status for status, _, _ in answers] == [202] * clients, answers
    assert len({body["id"] for _, body, _ in answers}) == 1
    assert all(body == answers[0][1] for _, body, _ in answers)
    replayed = [headers.get("Idempotency-Replayed") for _, _, headers in answers]
    assert replayed.count("true") == clients - 1 and replayed.count(None) == 1
    assert scalar("SELECT count(*) FROM executions WHERE org_id = :o", o=live_org.id) == 1
    assert elapsed < 20, elapsed
    execution_id = answers[0][1]["id"]
    assert wait_for(live_client, live_org, execution_id)["status"] == "succeeded"


def test_a_key_still_in_use_answers_409_within_seconds(live_client, live_org):
    make_agent(live_client, live_org)
    holder = db.engine.connect()
    holding = holder.begin()
    # Another request's transaction that holds the key and has not finished.
    holder.execute(
        text("INSERT INTO idempotency_keys (org_id, key, request_hash) VALUES (:o, 'busy', 'h')"),
        {"o": live_org.id},
    )
    try:
        began = time.monotonic()
        waited = live_client.post(
            SUBMIT, json={"input": {"text": "hi"}}, headers=keyed(live_org, "busy")
        )
        elapsed = time.monotonic() - began
        assert waited.status_code == 409, waited.get_json()
        assert "in progress" in waited.json["message"] and waited.json["hint"]
        assert 3 < elapsed < 9, elapsed
    finally:
        holding.rollback()
        holder.close()
    # The holder gave up: the key is free.
    after = live_client.post(
        SUBMIT, json={"input": {"text": "hi"}}, headers=keyed(live_org, "busy")
    )
    assert after.status_code == 202 and "Idempotency-Replayed" not in after.headers
    assert scalar("SELECT count(*) FROM executions WHERE org_id = :o", o=live_org.id) == 1


def test_keyed_runs_are_published_only_after_the_commit(live_client, live_org):
    """The commit of each keyed request takes 1.5 s (a deferred trigger). A message sent before
    it would reach the worker while the row is still invisible: the claim would find nothing,
    drop the message, and the run would stay queued (no sweeper runs in tests)."""
    make_agent(live_client, live_org)
    number = {"type": "object", "required": ["value"], "properties": {"value": {"type": "integer"}}}
    adder = {
        "name": "adder",
        "runtime": {"type": "python", "entrypoint": "tests.agents:add"},
        "input_schema": number,
        "output_schema": number,
    }
    chain = {"name": "one", "input_schema": number, "steps": [{"name": "only", "agent": "adder"}]}
    for path, definition in ("/api/v1/agents", adder), ("/api/v1/chains", chain):
        created = live_client.post(path, json=definition, headers=live_org.headers)
        assert created.status_code == 201, created.get_json()
    slow = "IF NEW.input ? 'slow_commit' THEN PERFORM pg_sleep(1.5); END IF;"
    with deferred_trigger(slow, tables=("executions", "chain_executions")):
        began = time.monotonic()
        submitted = live_client.post(
            SUBMIT,
            json={"input": {"text": "hi", "slow_commit": True}},
            headers=keyed(live_org, "slow-run"),
        )
        assert submitted.status_code == 202
        assert time.monotonic() - began > 1.4  # the commit did wait
        started = live_client.post(
            "/api/v1/chains/one/executions",
            json={"input": {"value": 1, "slow_commit": True}},
            headers=keyed(live_org, "slow-chain"),
        )
        assert started.status_code == 202
        execution = wait_for(live_client, live_org, submitted.json["id"])
        assert execution["status"] == "succeeded", execution
        deadline = time.monotonic() + 30
        while True:
            chain_run = live_client.get(
                f"/api/v1/chain-executions/{started.json['id']}", headers=live_org.headers
            ).get_json()
            if chain_run["status"] not in ("queued", "running") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert chain_run["status"] == "succeeded", chain_run


def test_a_keyed_request_whose_commit_fails_publishes_nothing(live_client, live_org):
    """The request's work is done and its publish is waiting when PostgreSQL refuses the commit:
    the answer is a 5xx, no message reaches the broker, and the key stays free."""
    queue = f"idem-nobody-{uuid.uuid4().hex[:8]}"  # no worker serves it
    make_agent(live_client, live_org, queue=queue)
    body = {"input": {"text": "hi", "fail_commit": True}}
    refuse = "IF NEW.input ? 'fail_commit' THEN RAISE EXCEPTION 'refused at commit'; END IF;"
    with deferred_trigger(refuse):
        failed = live_client.post(SUBMIT, json=body, headers=keyed(live_org, "doomed"))
        assert failed.status_code == 500, failed.get_json()
        time.sleep(1.5)  # a message sent anyway would have reached Redis by now
        assert queued_messages(queue) == 0
        assert scalar("SELECT count(*) FROM executions WHERE org_id = :o", o=live_org.id) == 0
        assert scalar("SELECT count(*) FROM idempotency_keys WHERE org_id = :o", o=live_org.id) == 0
    retried = live_client.post(SUBMIT, json=body, headers=keyed(live_org, "doomed"))
    assert retried.status_code == 202 and "Idempotency-Replayed" not in retried.headers
    # The same check sees a message once one is sent (by the API's dispatcher thread, a moment
    # after the answer).
    wait_until(lambda: queued_messages(queue) == 1, timeout=5)
