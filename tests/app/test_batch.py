"""Batch submit: many inputs of one agent, stored and queued all at once or not at all."""

import uuid

import pytest
from sqlalchemy import text

from tests.app.test_executions_api import ECHO, make_agent
from tests.conftest import make_token, wait_for

BATCH = "/api/v1/agents/{agent}/executions/batch"


def submit_batch(client, org, items, agent="echo", **extra):
    return client.post(
        BATCH.format(agent=agent), json={"items": items, **extra}, headers=org.headers
    )


def stored(connection, org) -> list:
    return connection.execute(
        text("SELECT id, priority, input, status FROM executions WHERE org_id = :org"),
        {"org": org.id},
    ).all()


def test_a_batch_is_stored_queued_and_answered_in_item_order(client, org, connection):
    make_agent(client, org)
    items = [{"input": {"text": f"item {n}"}, "priority": n % 10} for n in range(25)]
    response = submit_batch(client, org, items)
    assert response.status_code == 202, response.get_json()
    ids = response.get_json()["ids"]
    assert len(ids) == 25 and len(set(ids)) == 25
    rows = {str(row.id): row for row in stored(connection, org)}
    assert set(rows) == set(ids)
    for execution_id, item in zip(ids, items, strict=True):
        row = rows[execution_id]
        assert row.input == item["input"] and row.priority == item["priority"]
        assert row.status == "queued"
    read = client.get(f"/api/v1/executions/{ids[3]}", headers=org.headers).get_json()
    assert read["input"] == {"text": "item 3"} and read["agent_version"] == "1.0.0"


def test_priority_defaults_to_5_and_a_pinned_version_is_used(client, org, connection):
    make_agent(client, org)
    client.patch("/api/v1/agents/echo", json={"timeout_seconds": 30}, headers=org.headers)
    response = submit_batch(client, org, [{"input": {"text": "a"}}], version="1.0.0")
    assert response.status_code == 202, response.get_json()
    (execution_id,) = response.get_json()["ids"]
    read = client.get(f"/api/v1/executions/{execution_id}", headers=org.headers).get_json()
    assert read["priority"] == 5 and read["agent_version"] == "1.0.0"


def test_one_invalid_item_refuses_the_whole_batch_keyed_by_item(client, org, connection):
    make_agent(client, org)
    items = [
        {"input": {"text": "fine"}},
        {"input": {"count": 0}},
        {"input": {"text": "fine too"}},
        {"input": {"text": 7}},
    ]
    response = submit_batch(client, org, items)
    body = response.get_json()
    assert response.status_code == 422, body
    assert set(body["errors"]) == {"/items/1/input", "/items/1/input/count", "/items/3/input/text"}
    assert body["hint"]
    assert stored(connection, org) == [], "nothing is stored"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": []}, "/items"),
        ({"items": [{"input": {"text": "x"}}] * 1001}, "/items"),
        ({"items": [{"input": {"text": "x"}, "extra": 1}]}, "/items/0/extra"),
        ({"items": [{"input": {"text": "x"}, "priority": 10}]}, "/items/0/priority"),
        ({"items": [{}]}, "/items/0/input"),
        ({}, "/items"),
    ],
)
def test_the_batch_body_is_checked(client, org, connection, body, field):
    make_agent(client, org)
    response = client.post(BATCH.format(agent="echo"), json=body, headers=org.headers)
    assert response.status_code == 422, response.get_json()
    assert field in response.get_json()["errors"]
    assert stored(connection, org) == []


def test_the_largest_batch_is_taken(client, org, connection):
    make_agent(client, org)
    response = submit_batch(client, org, [{"input": {"text": str(n)}} for n in range(1000)])
    assert response.status_code == 202
    assert len(stored(connection, org)) == 1000


def test_unknown_agent_or_version_is_404_and_an_archived_agent_409(client, org, connection):
    assert submit_batch(client, org, [{"input": {}}], agent="nope").status_code == 404
    make_agent(client, org)
    response = submit_batch(client, org, [{"input": {"text": "x"}}], version="9.9.9")
    assert response.status_code == 404
    assert client.delete("/api/v1/agents/echo", headers=org.headers).status_code == 204
    response = submit_batch(client, org, [{"input": {"text": "x"}}])
    assert response.status_code == 409 and response.get_json()["hint"]
    assert stored(connection, org) == []


def test_a_nul_character_in_an_item_is_422(client, org, connection):
    make_agent(client, org)
    response = submit_batch(client, org, [{"input": {"text": "a\u0000b"}}])
    assert response.status_code == 422
    assert stored(connection, org) == []


def test_a_viewer_may_not_submit_a_batch(client, org):
    make_agent(client, org)
    headers = {"Authorization": f"Bearer {make_token(org, 'viewer')}"}
    response = client.post(
        BATCH.format(agent="echo"), json={"items": [{"input": {"text": "x"}}]}, headers=headers
    )
    assert response.status_code == 403


def test_an_idempotency_key_covers_the_whole_batch(client, org, connection):
    make_agent(client, org)
    headers = {**org.headers, "Idempotency-Key": f"batch-{uuid.uuid4()}"}
    body = {"items": [{"input": {"text": "a"}}, {"input": {"text": "b"}}]}
    first = client.post(BATCH.format(agent="echo"), json=body, headers=headers)
    again = client.post(BATCH.format(agent="echo"), json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.get_json()["ids"] == first.get_json()["ids"]
    assert again.headers.get("Idempotency-Replayed") == "true"
    assert len(stored(connection, org)) == 2


@pytest.mark.worker
def test_a_batch_runs_to_the_end_on_a_real_worker(live_client, live_org):
    response = live_client.post("/api/v1/agents", json=ECHO, headers=live_org.headers)
    assert response.status_code == 201
    items = [{"input": {"text": f"run {n}"}} for n in range(30)]
    response = live_client.post(
        BATCH.format(agent="echo"), json={"items": items}, headers=live_org.headers
    )
    assert response.status_code == 202
    for execution_id, item in zip(response.get_json()["ids"], items, strict=True):
        body = wait_for(live_client, live_org, execution_id)
        assert body["status"] == "succeeded", body
        assert body["input"] == item["input"]
