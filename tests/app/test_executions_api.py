"""Submitting, listing, reading and cancelling executions: the API side, no worker needed."""

import datetime as dt
import json
import uuid

from sqlalchemy import text

ECHO = {
    "name": "echo",
    "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
    "input_schema": {
        "type": "object",
        "required": ["text"],
        "properties": {"text": {"type": "string"}, "count": {"type": "integer", "minimum": 1}},
        "additionalProperties": False,
    },
}


def make_agent(client, org, body=ECHO):
    response = client.post("/api/v1/agents", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def submit(client, org, payload=None, agent="echo", **extra):
    return client.post(
        f"/api/v1/agents/{agent}/executions",
        json={"input": payload if payload is not None else {"text": "hi"}, **extra},
        headers=org.headers,
    )


def test_submit_answers_202_with_a_queued_execution(client, org, connection):
    agent = make_agent(client, org)
    response = submit(client, org)
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "queued" and body["attempts"] == 0
    assert body["agent_id"] == agent["id"] and body["agent_name"] == "echo"
    assert body["agent_version"] == "1.0.0" and body["input"] == {"text": "hi"}
    assert body["output"] is None and body["error"] is None and body["queued_at"]
    row = connection.execute(
        text("SELECT status, dispatched_at, org_id FROM executions WHERE id = :id"),
        {"id": body["id"]},
    ).one()
    assert row.status == "queued" and row.dispatched_at is not None and row.org_id == org.id
    read = client.get(f"/api/v1/executions/{body['id']}", headers=org.headers).get_json()
    assert read["id"] == body["id"] and read["status"] == "queued"


def test_invalid_input_is_422_keyed_by_pointer_and_nothing_is_queued(client, org, connection):
    make_agent(client, org)
    response = submit(client, org, {"count": 0, "extra": True})
    body = response.get_json()
    assert response.status_code == 422
    assert set(body["errors"]) == {"/input", "/input/count"}
    assert any("text" in message for message in body["errors"]["/input"])
    count = connection.execute(
        text("SELECT count(*) FROM executions WHERE org_id = :org"), {"org": org.id}
    ).scalar()
    assert count == 0


def test_submit_body_is_checked(client, org):
    make_agent(client, org)
    assert (
        client.post("/api/v1/agents/echo/executions", json={}, headers=org.headers).status_code
        == 422
    )
    assert submit(client, org, priority=10).status_code == 422
    assert submit(client, org, status="succeeded").status_code == 422
    not_object = client.post(
        "/api/v1/agents/echo/executions", json={"input": [1]}, headers=org.headers
    )
    assert not_object.status_code == 422


def test_unknown_agent_or_version_is_404(client, org):
    assert submit(client, org, agent="nobody").status_code == 404
    make_agent(client, org)
    assert submit(client, org, version="3.0.0").status_code == 404


def test_pinned_version_is_used_and_current_moves_on(client, org):
    make_agent(client, org)
    client.patch(
        "/api/v1/agents/echo",
        json={"input_schema": {"type": "object", "required": ["other"]}},
        headers=org.headers,
    )
    assert submit(client, org, {"text": "hi"}).status_code == 422
    pinned = submit(client, org, {"text": "hi"}, version="1.0.0")
    assert pinned.status_code == 202
    assert pinned.get_json()["agent_version"] == "1.0.0"
    current = submit(client, org, {"other": 1}).get_json()
    assert current["agent_version"] == "1.0.1"


def test_list_filters_newest_first(client, org, connection):
    make_agent(client, org)
    make_agent(client, org, {**ECHO, "name": "second"})
    first = submit(client, org).get_json()
    second = submit(client, org, agent="second").get_json()
    connection.execute(
        text(
            "UPDATE executions SET status = 'failed', queued_at = queued_at - interval '1 hour' "
            "WHERE id = :id"
        ),
        {"id": first["id"]},
    )

    def ids(query):
        response = client.get(f"/api/v1/executions{query}", headers=org.headers)
        assert response.status_code == 200, response.get_json()
        return [e["id"] for e in response.get_json()]

    assert ids("") == [second["id"], first["id"]]
    assert ids("?agent=echo") == [first["id"]]
    assert ids(f"?agent={second['agent_id']}") == [second["id"]]
    assert ids("?status=failed") == [first["id"]]
    assert ids("?status=queued") == [second["id"]]
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).isoformat()
    assert ids(f"?since={since.replace('+', '%2B')}") == [second["id"]]
    assert ids(f"?until={since.replace('+', '%2B')}") == [first["id"]]
    assert ids("?agent=nobody") == []
    bad = client.get("/api/v1/executions?status=done", headers=org.headers)
    assert bad.status_code == 422 and "status" in bad.get_json()["errors"]
    response = client.get("/api/v1/executions?page_size=1", headers=org.headers)
    assert json.loads(response.headers["X-Pagination"])["total"] == 2


def test_unknown_or_malformed_execution_id_is_404(client, org):
    assert client.get(f"/api/v1/executions/{uuid.uuid4()}", headers=org.headers).status_code == 404
    assert client.get("/api/v1/executions/not-a-uuid", headers=org.headers).status_code == 404
    logs = client.get(f"/api/v1/executions/{uuid.uuid4()}/logs", headers=org.headers)
    assert logs.status_code == 404


def test_cancel_a_queued_execution(client, org, connection):
    make_agent(client, org)
    execution = submit(client, org).get_json()
    response = client.post(f"/api/v1/executions/{execution['id']}/cancel", headers=org.headers)
    body = response.get_json()
    assert response.status_code == 202
    assert body["status"] == "cancelled" and body["error"]["type"] == "cancelled"
    again = client.post(f"/api/v1/executions/{execution['id']}/cancel", headers=org.headers)
    assert again.status_code == 409
    # The claim a worker would make finds nothing to take: the execution never starts.
    from app.executions import store

    assert store.claim(connection, uuid.UUID(execution["id"]), "w", 60)[0] is None


def test_logs_filters(client, org, connection):
    make_agent(client, org)
    execution = submit(client, org).get_json()
    lines = [(10, "debug detail"), (20, "Fetched 3 rows"), (30, "slow answer"), (40, "it failed")]
    for seq, (level, message) in enumerate(lines, start=1):
        connection.execute(
            text(
                "INSERT INTO execution_logs "
                "(execution_id, seq, attempt, org_id, ts, level, message) "
                "VALUES (:id, :seq, 1, :org_id, now(), :level, :message)"
            ),
            {
                "id": execution["id"],
                "seq": seq,
                "org_id": org.id,
                "level": level,
                "message": message,
            },
        )
    path = f"/api/v1/executions/{execution['id']}/logs"

    def messages(query=""):
        response = client.get(path + query, headers=org.headers)
        assert response.status_code == 200, response.get_json()
        return [line["message"] for line in response.get_json()]

    assert messages() == [m for _, m in lines]
    assert messages("?level=warning") == ["slow answer", "it failed"]
    assert messages("?q=ROWS") == ["Fetched 3 rows"]
    assert messages("?after_seq=2") == ["slow answer", "it failed"]
    assert messages("?limit=1") == ["debug detail"]
    line = client.get(path, headers=org.headers).get_json()[1]
    assert set(line) >= {"seq", "ts", "level", "message", "fields"} and line["level"] == "info"
    assert client.get(path + "?level=loud", headers=org.headers).status_code == 422


def test_a_nul_character_in_the_input_is_422(client, org):
    make_agent(client, org, {**ECHO, "input_schema": {"type": "object"}})
    response = submit(client, org, {"text": "a\u0000b"})
    assert response.status_code == 422
    assert "/input/text" in response.get_json()["errors"]
