"""Idempotency-Key on POSTs, inside the test's rolled-back transaction: replays, mismatches, scope,
expiry, refused keys, failures that leave the key free, pruning and the OpenAPI declaration.

What needs committed rows (concurrency, the lock timeout, publishing after commit with a real
worker) is in test_idempotency_live.py."""

import json

import pytest
from sqlalchemy import text

from app.idempotency import services as idempotency

ECHO = {
    "name": "echo",
    "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
    "input_schema": {
        "type": "object",
        "required": ["text"],
        "properties": {"text": {"type": "string"}, "count": {"type": "integer", "minimum": 1}},
    },
}
SUBMIT = "/api/v1/agents/echo/executions"


def keyed(org, key):
    return {**org.headers, "Idempotency-Key": key}


def make_echo(client, org):
    response = client.post("/api/v1/agents", json=ECHO, headers=org.headers)
    assert response.status_code == 201, response.get_json()


def count(connection, table, org):
    return connection.execute(
        text(f"SELECT count(*) FROM {table} WHERE org_id = :org"), {"org": org.id}
    ).scalar()


def test_repeat_gets_the_first_answer_and_creates_nothing(client, org, connection):
    make_echo(client, org)
    first = client.post(SUBMIT, json={"input": {"text": "hi"}}, headers=keyed(org, "k-1"))
    assert first.status_code == 202
    assert "Idempotency-Replayed" not in first.headers
    again = client.post(SUBMIT, json={"input": {"text": "hi"}}, headers=keyed(org, "k-1"))
    assert again.status_code == 202
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.get_json() == first.get_json()
    assert count(connection, "executions", org) == 1
    stored = connection.execute(
        text("SELECT response_status, response_body FROM idempotency_keys WHERE org_id = :org"),
        {"org": org.id},
    ).one()
    assert stored.response_status == 202 and stored.response_body["id"] == first.json["id"]


def test_same_key_with_another_body_is_422_and_runs_nothing(client, org, connection):
    make_echo(client, org)
    client.post(SUBMIT, json={"input": {"text": "hi"}}, headers=keyed(org, "k-2"))
    other = client.post(SUBMIT, json={"input": {"text": "bye"}}, headers=keyed(org, "k-2"))
    assert other.status_code == 422
    body = other.get_json()
    assert "Idempotency-Key" in body["errors"]
    assert "new key" in body["hint"]
    assert count(connection, "executions", org) == 1


def test_key_order_and_whitespace_are_the_same_body(client, org, connection):
    make_echo(client, org)
    compact = json.dumps({"input": {"text": "hi", "count": 2}, "priority": 3})
    spaced = '{ "priority" : 3,\n  "input": {"count": 2,   "text": "hi"} }'
    first = client.post(
        SUBMIT, data=compact, content_type="application/json", headers=keyed(org, "k-3")
    )
    again = client.post(
        SUBMIT, data=spaced, content_type="application/json", headers=keyed(org, "k-3")
    )
    assert first.status_code == again.status_code == 202
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.json["id"] == first.json["id"]
    assert count(connection, "executions", org) == 1


def test_another_key_is_another_execution(client, org, connection):
    make_echo(client, org)
    one = client.post(SUBMIT, json={"input": {"text": "hi"}}, headers=keyed(org, "k-a"))
    two = client.post(SUBMIT, json={"input": {"text": "hi"}}, headers=keyed(org, "k-b"))
    assert one.status_code == two.status_code == 202
    assert one.json["id"] != two.json["id"]
    assert "Idempotency-Replayed" not in two.headers
    assert count(connection, "executions", org) == 2


def test_a_422_answer_is_replayed_as_the_same_422(client, org, connection):
    make_echo(client, org)
    bad = {"input": {"count": 0}}
    first = client.post(SUBMIT, json=bad, headers=keyed(org, "k-bad"))
    assert first.status_code == 422 and "/input/count" in first.json["errors"]
    again = client.post(SUBMIT, json=bad, headers=keyed(org, "k-bad"))
    assert again.status_code == 422
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.get_json() == first.get_json()
    assert count(connection, "executions", org) == 0


def test_the_same_key_on_another_route_is_another_request(client, org):
    created = client.post("/api/v1/agents", json=ECHO, headers=keyed(org, "k-route"))
    assert created.status_code == 201
    submitted = client.post(SUBMIT, json={"input": {"text": "hi"}}, headers=keyed(org, "k-route"))
    assert submitted.status_code == 422 and "Idempotency-Key" in submitted.json["errors"]


def test_keys_belong_to_one_organization(client, org, other_org, connection):
    make_echo(client, org)
    make_echo(client, other_org)
    mine = client.post(SUBMIT, json={"input": {"text": "hi"}}, headers=keyed(org, "shared"))
    theirs = client.post(SUBMIT, json={"input": {"text": "hi"}}, headers=keyed(other_org, "shared"))
    assert mine.status_code == theirs.status_code == 202
    assert "Idempotency-Replayed" not in theirs.headers
    assert mine.json["id"] != theirs.json["id"]
    assert count(connection, "executions", org) == count(connection, "executions", other_org) == 1
    # And another organization's different body under the same key is no mismatch either.
    different = client.post(
        SUBMIT, json={"input": {"text": "other"}}, headers=keyed(other_org, "mine-too")
    )
    assert different.status_code == 202


def test_a_key_older_than_24_hours_is_taken_over(client, org, connection):
    make_echo(client, org)
    first = client.post(SUBMIT, json={"input": {"text": "hi"}}, headers=keyed(org, "k-old"))
    connection.execute(
        text(
            "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' "
            "WHERE org_id = :org"
        ),
        {"org": org.id},
    )
    # Expired: even another body is a fresh request under the old key.
    later = client.post(SUBMIT, json={"input": {"text": "later"}}, headers=keyed(org, "k-old"))
    assert later.status_code == 202 and "Idempotency-Replayed" not in later.headers
    assert later.json["id"] != first.json["id"]
    row = connection.execute(
        text(
            "SELECT response_body, created_at > now() - interval '1 minute' AS fresh "
            "FROM idempotency_keys WHERE org_id = :org"
        ),
        {"org": org.id},
    ).one()
    assert row.fresh and row.response_body["id"] == later.json["id"]
    replay = client.post(SUBMIT, json={"input": {"text": "later"}}, headers=keyed(org, "k-old"))
    assert replay.json["id"] == later.json["id"] and replay.headers["Idempotency-Replayed"]
    assert count(connection, "executions", org) == 2


@pytest.mark.parametrize("key", ["x" * 256, "tab\there", "bell\x07", ""])
def test_long_or_unprintable_keys_are_refused(client, org, connection, key):
    make_echo(client, org)
    response = client.post(SUBMIT, json={"input": {"text": "hi"}}, headers=keyed(org, key))
    assert response.status_code == 422
    assert "Idempotency-Key" in response.json["errors"] and response.json["hint"]
    assert count(connection, "executions", org) == 0
    assert count(connection, "idempotency_keys", org) == 0


def test_a_255_character_key_is_fine(client, org):
    make_echo(client, org)
    response = client.post(SUBMIT, json={"input": {"text": "hi"}}, headers=keyed(org, "k" * 255))
    assert response.status_code == 202


FAIL_MARKED_INSERT = """
    CREATE FUNCTION idem_fail_marked() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.input ? 'explode' THEN RAISE EXCEPTION 'refused by the test'; END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER fail_marked BEFORE INSERT ON executions
        FOR EACH ROW EXECUTE FUNCTION idem_fail_marked();
"""


def test_a_request_that_fails_with_a_5xx_leaves_the_key_free(client, org, connection):
    make_echo(client, org)
    # A real statement failure inside the handler: PostgreSQL refuses the INSERT. (DDL in the
    # test's transaction: rolled back with it, seen by no other connection.)
    connection.exec_driver_sql(FAIL_MARKED_INSERT)
    body = {"input": {"text": "hi", "explode": True}}
    failed = client.post(SUBMIT, json=body, headers=keyed(org, "k-5xx"))
    assert failed.status_code == 500
    assert count(connection, "idempotency_keys", org) == 0
    assert count(connection, "executions", org) == 0
    connection.exec_driver_sql("DROP TRIGGER fail_marked ON executions")
    retried = client.post(SUBMIT, json=body, headers=keyed(org, "k-5xx"))
    assert retried.status_code == 202 and "Idempotency-Replayed" not in retried.headers
    assert count(connection, "executions", org) == 1


def test_a_nul_character_is_refused_before_the_key_is_taken(client, org, connection):
    """The edge refuses U+0000 before any work: the repeat gets the same 422, and the key stays
    free for a corrected body."""
    make_echo(client, org)
    body = {"input": {"text": "a\u0000b"}}
    first = client.post(SUBMIT, json=body, headers=keyed(org, "k-nul"))
    assert first.status_code == 422
    again = client.post(SUBMIT, json=body, headers=keyed(org, "k-nul"))
    assert again.status_code == 422 and again.get_json() == first.get_json()
    assert count(connection, "idempotency_keys", org) == 0
    fixed = client.post(SUBMIT, json={"input": {"text": "ab"}}, headers=keyed(org, "k-nul"))
    assert fixed.status_code == 202
    assert count(connection, "executions", org) == 1


def test_agent_and_chain_creates_and_chain_runs_replay(client, org, connection):
    adder = {
        "name": "adder",
        "runtime": {"type": "python", "entrypoint": "tests.agents:add"},
        "input_schema": {"type": "object", "properties": {"value": {"type": "integer"}}},
    }
    agent = client.post("/api/v1/agents", json=adder, headers=keyed(org, "agent"))
    agent_again = client.post("/api/v1/agents", json=adder, headers=keyed(org, "agent"))
    assert agent.status_code == agent_again.status_code == 201
    assert agent_again.json == agent.json and agent_again.headers["Idempotency-Replayed"]
    # Without the key the same body is a name clash: the replay is not a second create.
    assert client.post("/api/v1/agents", json=adder, headers=org.headers).status_code == 409
    chain = {"name": "once", "steps": [{"name": "only", "agent": "adder"}]}
    created = client.post("/api/v1/chains", json=chain, headers=keyed(org, "chain"))
    created_again = client.post("/api/v1/chains", json=chain, headers=keyed(org, "chain"))
    assert created.status_code == created_again.status_code == 201
    assert created_again.json["id"] == created.json["id"]
    run = {"input": {"value": 1}}
    started = client.post("/api/v1/chains/once/executions", json=run, headers=keyed(org, "run"))
    started_again = client.post(
        "/api/v1/chains/once/executions", json=run, headers=keyed(org, "run")
    )
    assert started.status_code == started_again.status_code == 202
    assert started_again.json["id"] == started.json["id"]
    assert count(connection, "agents", org) == 1
    assert count(connection, "chains", org) == 1
    assert count(connection, "chain_executions", org) == 1


def test_cancel_with_a_key_answers_its_first_202_again(client, org, connection):
    make_echo(client, org)
    execution = client.post(SUBMIT, json={"input": {"text": "hi"}}, headers=org.headers).json
    path = f"/api/v1/executions/{execution['id']}/cancel"
    first = client.post(path, headers=keyed(org, "cancel-1"))
    assert first.status_code == 202 and first.json["status"] == "cancelled"
    again = client.post(path, headers=keyed(org, "cancel-1"))
    assert again.status_code == 202 and again.headers["Idempotency-Replayed"] == "true"
    assert again.get_json() == first.get_json()
    # Without the key a second cancel is the contract's 409.
    assert client.post(path, headers=org.headers).status_code == 409


def test_requests_without_a_key_store_nothing(client, org, connection):
    make_echo(client, org)
    client.post(SUBMIT, json={"input": {"text": "hi"}}, headers=org.headers)
    # GETs ignore the header.
    client.get("/api/v1/agents", headers=keyed(org, "get"))
    assert count(connection, "idempotency_keys", org) == 0


def test_prune_deletes_only_expired_keys_in_batches(connection, org, other_org):
    for owner, key, age in [
        (org, "old-1", "25 hours"),
        (org, "old-2", "2 days"),
        (other_org, "old-3", "24 hours 1 second"),
        (org, "young", "23 hours 59 minutes"),
        (other_org, "new", "0 seconds"),
    ]:
        connection.execute(
            text(
                "INSERT INTO idempotency_keys (org_id, key, request_hash, response_status, "
                "response_body, created_at) VALUES (:org, :key, 'h', 202, '{}', "
                "now() - CAST(:age AS interval))"
            ),
            {"org": owner.id, "key": key, "age": age},
        )
    assert idempotency.prune(batch_size=2) == 3
    left = connection.execute(
        text("SELECT key FROM idempotency_keys WHERE org_id IN (:a, :b) ORDER BY key"),
        {"a": org.id, "b": other_org.id},
    ).scalars()
    assert list(left) == ["new", "young"]
    assert idempotency.prune() == 0


def test_beat_prunes_the_keys():
    from workers.maintenance import IDEMPOTENCY_PRUNE_SECONDS, default_jobs

    prune = next(job for job in default_jobs() if job.name == "idempotency-prune")
    assert prune.every_seconds == IDEMPOTENCY_PRUNE_SECONDS


def test_openapi_declares_the_header_and_its_answers(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    posts = {
        path: item["post"]
        for path, item in spec["paths"].items()
        if "post" in item and path.startswith("/api/v1/")
    }
    assert "/api/v1/agents/{ref}/executions" in posts and "/api/v1/chains" in posts
    for path, operation in posts.items():
        names = [p.get("name") or p.get("$ref") for p in operation.get("parameters", [])]
        assert any("Idempotency" in str(name) for name in names), path
        assert {"409", "422"} <= set(operation["responses"]), path
    hook = spec["paths"]["/hooks/{trigger_id}"]["post"]
    assert not any("Idempotency" in str(p) for p in hook.get("parameters", []))


def test_request_hash_is_canonical():
    same = idempotency.request_hash("POST", "/p", b'{"a": 1, "b": [1, 2]}')
    assert same == idempotency.request_hash("POST", "/p", b'{"b":[1,2],"a":1}')
    assert same != idempotency.request_hash("POST", "/q", b'{"a": 1, "b": [1, 2]}')
    assert same != idempotency.request_hash("POST", "/p", b'{"a": 2, "b": [1, 2]}')
    assert idempotency.request_hash("POST", "/p", b"{not json") != same
    assert len(same) == 64  # sha256, in hex


def test_trigger_now_with_a_key_fires_once_and_publishes_after_commit(client, org, connection):
    make_echo(client, org)
    schedule = {
        "name": "nightly",
        "target": {"agent": "echo"},
        "cron": "0 2 * * *",
        "timezone": "UTC",
        "input": {"text": "report"},
        "enabled": False,
    }
    created = client.post("/api/v1/schedules", json=schedule, headers=org.headers).json
    path = f"/api/v1/schedules/{created['id']}/trigger"
    fired = client.post(path, headers=keyed(org, "fire-once"))
    again = client.post(path, headers=keyed(org, "fire-once"))
    assert fired.status_code == again.status_code == 202
    assert again.get_json() == fired.get_json() and again.headers["Idempotency-Replayed"]
    assert count(connection, "executions", org) == 1
    # The publish held back for the commit did run: it stamps the row it sent.
    dispatched = connection.execute(
        text("SELECT dispatched_at FROM executions WHERE id = :id"),
        {"id": fired.json["execution_id"]},
    ).scalar()
    assert dispatched is not None
