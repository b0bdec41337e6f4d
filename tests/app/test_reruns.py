"""Reruns through the API, no worker: the originals are finished by hand (a worker's finish
is one UPDATE; tests/workers/test_reruns.py runs them for real). Single reruns with each version
choice, refusals, the bulk rerun's filter, count, cap, quota and validation."""

import uuid

import pytest
from sqlalchemy import text

from tests.app.test_executions_api import ECHO, make_agent, submit
from tests.app.test_quotas import assert_quota_refusal, set_limits


def finish(connection, execution_id, status="failed", error_type="runtime_error", when=None):
    connection.execute(
        text(
            "UPDATE executions SET status = CAST(:status AS text), attempt = 1, "
            "started_at = now(), "
            "finished_at = coalesce(CAST(:when AS timestamptz), now()), "
            "error = CASE WHEN CAST(:status AS text) = 'succeeded' THEN NULL "
            "ELSE jsonb_build_object('type', CAST(:type AS text), 'message', 'x') END "
            "WHERE id = :id"
        ),
        {"id": execution_id, "status": status, "type": error_type, "when": when},
    )


def finished(client, org, connection, payload=None, **finish_args):
    response = submit(client, org, payload)
    assert response.status_code == 202, response.get_json()
    execution_id = response.get_json()["id"]
    finish(connection, execution_id, **finish_args)
    return execution_id


def rerun(client, org, execution_id, **body):
    return client.post(f"/api/v1/executions/{execution_id}/rerun", json=body, headers=org.headers)


def bulk(client, org, **body):
    return client.post("/api/v1/executions/rerun", json=body, headers=org.headers)


def count(connection, org, where="true"):
    return connection.execute(
        text(f"SELECT count(*) FROM executions WHERE org_id = :org AND {where}"), {"org": org.id}
    ).scalar_one()


def test_a_rerun_is_a_new_queued_execution_naming_its_original(client, org, connection):
    make_agent(client, org)
    original = finished(client, org, connection, {"text": "hi", "count": 2})
    response = rerun(client, org, original)
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["rerun_of"] == original and body["id"] != original
    assert body["status"] == "queued" and body["input"] == {"text": "hi", "count": 2}
    assert body["agent_version"] == "1.0.0"
    read = client.get(f"/api/v1/executions/{body['id']}", headers=org.headers).get_json()
    assert read == body
    listed = client.get("/api/v1/executions", headers=org.headers).get_json()
    assert {item["id"]: item["rerun_of"] for item in listed} == {
        body["id"]: original,
        original: None,
    }


def test_a_new_input_is_checked_against_the_version_by_pointer(client, org, connection):
    make_agent(client, org)
    original = finished(client, org, connection)
    ok = rerun(client, org, original, input={"text": "new"})
    assert ok.status_code == 202 and ok.get_json()["input"] == {"text": "new"}
    before = count(connection, org)
    bad = rerun(client, org, original, input={"text": 5, "count": 0})
    body = bad.get_json()
    assert bad.status_code == 422, body
    assert set(body["errors"]) == {"/input/text", "/input/count"} and body["hint"]
    assert count(connection, org) == before, "nothing stored"


def test_each_version_choice(client, org, connection):
    make_agent(client, org)
    original = finished(client, org, connection)
    patched = client.patch(
        "/api/v1/agents/echo",
        json={"input_schema": {**ECHO["input_schema"], "required": []}},
        headers=org.headers,
    )
    assert patched.status_code == 200, patched.get_json()
    same = rerun(client, org, original).get_json()
    assert same["agent_version"] == "1.0.0"
    assert rerun(client, org, original, version="same").get_json()["agent_version"] == "1.0.0"
    current = rerun(client, org, original, version="current").get_json()
    assert current["agent_version"] == "1.0.1"
    pinned = rerun(client, org, original, version="1.0.1").get_json()
    assert pinned["agent_version"] == "1.0.1"
    missing = rerun(client, org, original, version="9.9.9")
    assert missing.status_code == 404 and "9.9.9" in missing.get_json()["message"]
    assert missing.get_json()["hint"]


def test_an_unfinished_original_is_409_with_a_hint(client, org, connection):
    make_agent(client, org)
    queued = submit(client, org).get_json()["id"]
    response = rerun(client, org, queued)
    assert response.status_code == 409
    assert "not finished" in response.get_json()["message"] and response.get_json()["hint"]
    connection.execute(
        text("UPDATE executions SET status = 'running' WHERE id = :id"), {"id": queued}
    )
    assert rerun(client, org, queued).status_code == 409


def test_another_org_or_an_unknown_id_is_404(client, org, other_org, connection):
    make_agent(client, org)
    original = finished(client, org, connection)
    assert rerun(client, other_org, original).status_code == 404
    assert rerun(client, org, uuid.uuid4()).status_code == 404
    assert rerun(client, org, "not-an-id").status_code == 404
    assert bulk(client, other_org).get_json() == {"matched": 0, "ids": []}


def test_an_archived_agent_is_409(client, org, connection):
    make_agent(client, org)
    original = finished(client, org, connection)
    assert client.delete("/api/v1/agents/echo", headers=org.headers).status_code == 204
    response = rerun(client, org, original)
    assert response.status_code == 409 and "archived" in response.get_json()["message"]


def test_a_viewer_may_not_rerun(client, org, connection):
    from tests.conftest import bearer, make_token

    make_agent(client, org)
    original = finished(client, org, connection)
    viewer = bearer(make_token(org, "viewer"))
    assert (
        client.post(f"/api/v1/executions/{original}/rerun", json={}, headers=viewer).status_code
        == 403
    )
    assert client.post("/api/v1/executions/rerun", json={}, headers=viewer).status_code == 403


def test_an_idempotency_key_returns_the_first_rerun(client, org, connection):
    make_agent(client, org)
    original = finished(client, org, connection)
    headers = {**org.headers, "Idempotency-Key": "rerun-once"}
    first = client.post(f"/api/v1/executions/{original}/rerun", json={}, headers=headers)
    again = client.post(f"/api/v1/executions/{original}/rerun", json={}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.get_json()["id"] == again.get_json()["id"]
    assert count(connection, org, "rerun_of IS NOT NULL") == 1


def test_bulk_dry_run_counts_and_the_real_one_reruns_at_most_max(client, org, connection):
    make_agent(client, org)
    failed = [finished(client, org, connection, when=f"2026-01-01T00:00:0{i}Z") for i in range(3)]
    finished(client, org, connection, status="succeeded")
    timed_out = finished(client, org, connection, status="timed_out", error_type="timeout")
    submit(client, org)  # queued: never matches
    filter_ = {"status": ["failed", "timed_out"]}
    dry = bulk(client, org, filter=filter_, dry_run=True)
    assert dry.status_code == 200 and dry.get_json() == {"matched": 4}
    assert count(connection, org, "rerun_of IS NOT NULL") == 0, "a dry run stores nothing"
    real = bulk(client, org, filter=filter_, max=2)
    body = real.get_json()
    assert real.status_code == 202, body
    assert body["matched"] == 4 and len(body["ids"]) == 2
    rows = dict(
        connection.execute(
            text("SELECT id, rerun_of FROM executions WHERE id = ANY(:ids)"),
            {"ids": [uuid.UUID(i) for i in body["ids"]]},
        ).all()
    )
    # The cap takes those that finished first, in that order.
    assert [str(rows[uuid.UUID(i)]) for i in body["ids"]] == failed[:2]
    assert bulk(client, org, filter={"error_type": "timeout"}, dry_run=True).get_json() == {
        "matched": 1
    }
    everything = bulk(client, org, filter={"agent": "echo", "status": ["timed_out"]}).get_json()
    assert everything["matched"] == 1
    rerun_row = connection.execute(
        text("SELECT rerun_of, status FROM executions WHERE id = :id"),
        {"id": everything["ids"][0]},
    ).one()
    assert str(rerun_row.rerun_of) == timed_out and rerun_row.status == "queued"
    window = {"finished_after": "2026-01-01T00:00:01Z", "finished_before": "2026-01-01T00:00:02Z"}
    assert bulk(client, org, filter=window, dry_run=True).get_json() == {"matched": 1}


def test_bulk_over_several_versions_keeps_each_original_version(client, org, connection):
    make_agent(client, org)
    first = finished(client, org, connection)
    client.patch(
        "/api/v1/agents/echo",
        json={"input_schema": {**ECHO["input_schema"], "required": []}},
        headers=org.headers,
    )
    second = finished(client, org, connection, payload={"text": "b"})
    body = bulk(client, org).get_json()
    versions = dict(
        connection.execute(
            text("SELECT rerun_of, agent_version FROM executions WHERE rerun_of IS NOT NULL")
        ).all()
    )
    assert body["matched"] == 2
    assert {str(k): v for k, v in versions.items()} == {first: "1.0.0", second: "1.0.1"}
    current = bulk(client, org, version="current", filter={"finished_before": "2100-01-01"})
    assert current.status_code == 202
    assert count(connection, org, "agent_version = '1.0.1' AND rerun_of IS NOT NULL") == 3


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({"filter": {"status": ["nope"]}}, "/filter/status/0"),
        ({"filter": {"status": ["running"]}}, "/filter/status/0"),
        ({"filter": {"status": []}}, "/filter/status"),
        ({"filter": {"finished_after": "yesterday"}}, "/filter/finished_after"),
        (
            {
                "filter": {
                    "finished_after": "2026-02-01T00:00:00Z",
                    "finished_before": "2026-01-01T00:00:00Z",
                }
            },
            "/filter/finished_after",
        ),
        ({"max": 0}, "/max"),
        ({"max": 10001}, "/max"),
        ({"filter": {"owner": "x"}}, "/filter/owner"),
        ({"dry_run": "maybe"}, "/dry_run"),
    ],
)
def test_bulk_body_and_filter_are_checked(client, org, body, pointer):
    response = bulk(client, org, **body)
    assert response.status_code == 422, response.get_json()
    assert pointer in response.get_json()["errors"], response.get_json()


def test_bulk_past_max_queued_is_429_and_stores_nothing(client, org, connection):
    make_agent(client, org)
    for _ in range(2):
        finished(client, org, connection)
    submit(client, org)  # one not yet started
    set_limits(org, max_queued=2)
    before = count(connection, org)
    assert_quota_refusal(bulk(client, org), "max_queued")
    assert count(connection, org) == before
    too_many = bulk(client, org, max=3, filter={"finished_before": "2100-01-01T00:00:00Z"})
    assert too_many.status_code == 429, "2 finished match; the cap does not add any"
    assert bulk(client, org, max=1).status_code == 202


def test_bulk_refuses_inputs_the_chosen_version_rejects_keyed_by_original(client, org, connection):
    make_agent(client, org)
    original = finished(client, org, connection)
    client.patch(
        "/api/v1/agents/echo",
        json={"input_schema": {"type": "object", "required": ["other"]}},
        headers=org.headers,
    )
    before = count(connection, org)
    response = bulk(client, org, version="current")
    assert response.status_code == 422, response.get_json()
    assert list(response.get_json()["errors"]) == [f"/executions/{original}/input"]
    assert count(connection, org) == before


def test_a_rerun_takes_the_traceparent_of_its_own_request(client, org, connection):
    make_agent(client, org)
    original = finished(client, org, connection)
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = {**org.headers, "traceparent": trace}
    one = client.post(f"/api/v1/executions/{original}/rerun", json={}, headers=headers)
    assert one.status_code == 202 and one.get_json()["traceparent"] == trace
    many = client.post("/api/v1/executions/rerun", json={"filter": {}}, headers=headers)
    assert many.status_code == 202, many.get_json()
    [again] = many.get_json()["ids"]
    read = client.get(f"/api/v1/executions/{again}", headers=org.headers).get_json()
    assert read["traceparent"] == trace
    # Without the header a rerun has none: the original's trace is not reused.
    assert rerun(client, org, original).get_json()["traceparent"] is None
