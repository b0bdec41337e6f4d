"""Schedules over the API without beat: definitions, validation, pause, resume, trigger, history."""

import datetime as dt

from sqlalchemy import text

from tests.app.test_executions_api import ECHO, make_agent


def schedule_body(**overrides):
    body = {
        "name": "nightly",
        "target": {"agent": "echo"},
        "cron": "0 2 * * *",
        "timezone": "Europe/Paris",
        "input": {"text": "report"},
    }
    body.update(overrides)
    return body


def create(client, org, **overrides):
    return client.post("/api/v1/schedules", json=schedule_body(**overrides), headers=org.headers)


def test_create_answers_201_with_next_fire_at_in_the_timezone(client, org):
    make_agent(client, org)
    response = create(client, org)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["target"] == {"agent": "echo"} and body["enabled"] is True
    assert body["overlap"] == "skip" and body["catchup"] == "latest"
    assert body["catchup_window_seconds"] == 3600 and body["pause_after_failures"] == 0
    next_fire = dt.datetime.fromisoformat(body["next_fire_at"])
    local = next_fire.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris"))
    assert (local.hour, local.minute) in ((2, 0), (3, 0))  # 03:00 only on the spring-forward day
    assert next_fire > dt.datetime.now(dt.UTC)
    read = client.get(f"/api/v1/schedules/{body['id']}", headers=org.headers).get_json()
    assert read == body
    assert client.get("/api/v1/schedules/nightly", headers=org.headers).get_json() == body
    listed = client.get("/api/v1/schedules", headers=org.headers)
    assert [item["id"] for item in listed.get_json()] == [body["id"]]
    assert "X-Pagination" in listed.headers


def test_invalid_cron_timezone_target_and_input_are_422_with_pointers(client, org):
    make_agent(client, org)
    cases = [
        ({"cron": "61 * * * *"}, "/cron"),
        ({"cron": "* * *"}, "/cron"),
        ({"cron": "0 0 * * * * *"}, "/cron"),
        ({"timezone": "Mars/Olympus"}, "/timezone"),
        ({"target": {"agent": "nope"}}, "/target/agent"),
        ({"target": {"agent": "echo", "version": "9.9.9"}}, "/target/version"),
        ({"target": {}}, "/target/agent"),
        ({"input": {"count": 0}}, "/input"),
        ({"input": {"text": "x", "count": 0}}, "/input/count"),
        ({"overlap": "sometimes"}, "/overlap"),
        ({"catchup": "all", "catchup_window_seconds": 0}, "/catchup_window_seconds"),
        ({"pause_after_failures": -1}, "/pause_after_failures"),
        ({"next_fire_at": "2030-01-01T00:00:00Z"}, "/next_fire_at"),
        ({"name": "Not A Name"}, "/name"),
    ]
    for overrides, pointer in cases:
        response = create(client, org, **overrides)
        assert response.status_code == 422, (overrides, response.get_json())
        assert pointer in response.get_json()["errors"], (overrides, response.get_json())


ADD = {
    "name": "adder",
    "runtime": {"type": "python", "entrypoint": "tests.agents:add"},
    "input_schema": {
        "type": "object",
        "required": ["value"],
        "properties": {"value": {"type": "integer"}, "by": {"type": "integer"}},
    },
    "output_schema": {
        "type": "object",
        "required": ["value"],
        "properties": {"value": {"type": "integer"}},
    },
}


def make_chain(client, org, name="pair"):
    make_agent(client, org, ADD)
    body = {
        "name": name,
        "input_schema": ADD["input_schema"],
        "steps": [{"name": "one", "agent": "adder"}, {"name": "two", "agent": "adder"}],
    }
    response = client.post("/api/v1/chains", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()


def test_a_chain_target_is_stored_with_its_version(client, org, connection):
    make_chain(client, org)
    response = create(client, org, target={"chain": "pair", "version": "1.0.0"}, input={"value": 1})
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["target"] == {"chain": "pair", "version": "1.0.0"}
    row = connection.execute(
        text("SELECT agent_id, chain_id FROM schedules WHERE id = :id"), {"id": body["id"]}
    ).one()
    assert row.agent_id is None and row.chain_id is not None
    patched = client.patch(
        f"/api/v1/schedules/{body['id']}", json={"input": {"value": "x"}}, headers=org.headers
    )
    assert patched.status_code == 422 and "/input/value" in patched.get_json()["errors"]


def test_bad_chain_name_version_or_input_is_422_with_a_hint(client, org):
    make_chain(client, org)
    cases = [
        ({"target": {"chain": "nope"}, "input": {"value": 1}}, "/target/chain"),
        (
            {"target": {"chain": "pair", "version": "9.9.9"}, "input": {"value": 1}},
            "/target/version",
        ),
        ({"target": {"chain": "pair"}, "input": {}}, "/input"),
        ({"target": {"chain": "pair"}, "input": {"value": "one"}}, "/input/value"),
        ({"target": {"chain": "pair", "agent": "adder"}, "input": {"value": 1}}, "/target/agent"),
    ]
    for overrides, pointer in cases:
        response = create(client, org, **overrides)
        body = response.get_json()
        assert response.status_code == 422, (overrides, body)
        assert pointer in body["errors"], (overrides, body)
    client.delete("/api/v1/chains/pair", headers=org.headers)
    archived = create(client, org, target={"chain": "pair"}, input={"value": 1})
    body = archived.get_json()
    assert archived.status_code == 422 and body["errors"] == {"/target/chain": ["archived"]}
    assert body["hint"]


def test_a_chain_of_another_organization_is_unknown(client, org, other_org):
    make_chain(client, other_org)
    response = create(client, org, target={"chain": "pair"}, input={"value": 1})
    assert response.status_code == 422 and "/target/chain" in response.get_json()["errors"]


def test_six_fields_take_seconds_first(client, org):
    make_agent(client, org)
    body = create(client, org, cron="*/15 * * * * *", timezone="UTC").get_json()
    assert dt.datetime.fromisoformat(body["next_fire_at"]).second in (0, 15, 30, 45)


def test_name_clash_is_409_and_another_org_sees_404(client, org, other_org):
    make_agent(client, org)
    assert create(client, org).status_code == 201
    assert create(client, org).status_code == 409
    schedule = client.get("/api/v1/schedules/nightly", headers=org.headers).get_json()
    for path in ("", "/history"):
        response = client.get(
            f"/api/v1/schedules/{schedule['id']}{path}", headers=other_org.headers
        )
        assert response.status_code == 404
    for action in ("pause", "resume", "trigger"):
        response = client.post(
            f"/api/v1/schedules/{schedule['id']}/{action}", headers=other_org.headers
        )
        assert response.status_code == 404


def test_patch_recomputes_next_fire_at_and_revalidates(client, org):
    make_agent(client, org)
    created = create(client, org).get_json()
    response = client.patch(
        f"/api/v1/schedules/{created['id']}",
        json={"cron": "*/5 * * * * *", "timezone": "UTC"},
        headers=org.headers,
    )
    patched = response.get_json()
    assert response.status_code == 200, patched
    soon = dt.datetime.fromisoformat(patched["next_fire_at"]) - dt.datetime.now(dt.UTC)
    assert soon <= dt.timedelta(seconds=5)
    bad = client.patch(
        f"/api/v1/schedules/{created['id']}", json={"input": {"text": 1}}, headers=org.headers
    )
    assert bad.status_code == 422 and "/input/text" in bad.get_json()["errors"]
    renamed = client.patch(
        f"/api/v1/schedules/{created['id']}", json={"name": "renamed"}, headers=org.headers
    )
    assert renamed.get_json()["name"] == "renamed"
    assert renamed.get_json()["next_fire_at"] == patched["next_fire_at"]


def test_pause_and_resume(client, org):
    make_agent(client, org)
    created = create(client, org).get_json()
    paused = client.post(f"/api/v1/schedules/{created['id']}/pause", headers=org.headers)
    assert paused.status_code == 200
    assert paused.get_json()["enabled"] is False and paused.get_json()["next_fire_at"] is None
    assert paused.get_json()["paused_reason"] == "paused through the API"
    resumed = client.post(f"/api/v1/schedules/{created['id']}/resume", headers=org.headers)
    body = resumed.get_json()
    assert body["enabled"] is True and body["paused_reason"] is None
    assert body["next_fire_at"] and body["consecutive_failures"] == 0
    disabled = client.patch(
        f"/api/v1/schedules/{created['id']}", json={"enabled": False}, headers=org.headers
    )
    assert disabled.get_json()["next_fire_at"] is None


def test_trigger_now_fires_at_once_and_lands_in_history(client, org, connection):
    make_agent(client, org)
    created = create(client, org, enabled=False).get_json()
    response = client.post(f"/api/v1/schedules/{created['id']}/trigger", headers=org.headers)
    fire = response.get_json()
    assert response.status_code == 202, fire
    assert fire["kind"] == "manual" and fire["status"] == "fired" and fire["execution_id"]
    execution = client.get(f"/api/v1/executions/{fire['execution_id']}", headers=org.headers)
    assert execution.get_json()["input"] == {"text": "report"}
    dispatched = connection.execute(
        text("SELECT dispatched_at FROM executions WHERE id = :id"), {"id": fire["execution_id"]}
    ).scalar()
    assert dispatched is not None
    history = client.get(f"/api/v1/schedules/{created['id']}/history", headers=org.headers)
    assert history.status_code == 200
    [entry] = history.get_json()
    assert entry["execution_id"] == fire["execution_id"] and entry["execution_status"] == "queued"
    read = client.get(f"/api/v1/schedules/{created['id']}", headers=org.headers).get_json()
    assert read["last_execution_id"] == fire["execution_id"]


def test_trigger_now_refuses_an_input_the_agent_no_longer_takes(client, org):
    make_agent(client, org)
    created = create(client, org).get_json()
    schema = {**ECHO["input_schema"], "required": ["text", "count"]}
    client.patch("/api/v1/agents/echo", json={"input_schema": schema}, headers=org.headers)
    response = client.post(f"/api/v1/schedules/{created['id']}/trigger", headers=org.headers)
    assert response.status_code == 422 and "/input" in response.get_json()["errors"]


def test_trigger_now_refuses_an_archived_agent(client, org):
    make_agent(client, org)
    created = create(client, org).get_json()
    client.delete("/api/v1/agents/echo", headers=org.headers)
    response = client.post(f"/api/v1/schedules/{created['id']}/trigger", headers=org.headers)
    assert response.status_code == 409 and response.get_json()["hint"]


def test_roles_and_delete(client, org):
    from tests.conftest import bearer, make_token

    make_agent(client, org)
    viewer = bearer(make_token(org, "viewer"))
    operator = bearer(make_token(org, "operator"))
    assert client.post("/api/v1/schedules", json=schedule_body(), headers=viewer).status_code == 403
    created = create(client, org).get_json()
    assert (
        client.post(f"/api/v1/schedules/{created['id']}/pause", headers=viewer).status_code == 403
    )
    assert (
        client.post(f"/api/v1/schedules/{created['id']}/pause", headers=operator).status_code == 200
    )
    assert client.delete(f"/api/v1/schedules/{created['id']}", headers=operator).status_code == 403
    assert (
        client.delete(f"/api/v1/schedules/{created['id']}", headers=org.headers).status_code == 204
    )
    assert client.get(f"/api/v1/schedules/{created['id']}", headers=org.headers).status_code == 404


def test_beat_finds_due_schedules_through_the_next_fire_time_index(connection):
    from app.schedules.firing import _DUE

    connection.execute(text("SET LOCAL enable_seqscan = off"))
    sql = str(_DUE.compile(compile_kwargs={"literal_binds": False})).replace(":now", "now()")
    plan = connection.execute(text("EXPLAIN " + sql.replace(":limit", "100"))).scalars().all()
    assert any("ix_schedules_due" in line for line in plan), plan


def test_trigger_now_inserts_a_chain_execution_and_409s_once_the_chain_is_archived(
    client, org, connection
):
    make_chain(client, org)
    created = create(client, org, target={"chain": "pair"}, input={"value": 1}).get_json()
    response = client.post(f"/api/v1/schedules/{created['id']}/trigger", headers=org.headers)
    assert response.status_code == 202, response.get_json()
    fired = response.get_json()
    assert fired["execution_id"] is None and fired["execution_status"] == "queued"
    row = connection.execute(
        text("SELECT chain_name, status, input FROM chain_executions WHERE id = :id"),
        {"id": fired["chain_execution_id"]},
    ).one()
    assert tuple(row) == ("pair", "queued", {"value": 1})
    [entry] = client.get(
        f"/api/v1/schedules/{created['id']}/history", headers=org.headers
    ).get_json()
    assert entry["chain_execution_id"] == fired["chain_execution_id"]

    client.delete("/api/v1/agents/adder", headers=org.headers)
    refused = client.post(f"/api/v1/schedules/{created['id']}/trigger", headers=org.headers)
    assert refused.status_code == 409 and "step 'one'" in refused.get_json()["message"]
    client.delete("/api/v1/chains/pair", headers=org.headers)
    refused = client.post(f"/api/v1/schedules/{created['id']}/trigger", headers=org.headers)
    assert refused.status_code == 409 and "archived" in refused.get_json()["message"]
    assert refused.get_json()["hint"]
    assert (
        len(
            client.get(f"/api/v1/schedules/{created['id']}/history", headers=org.headers).get_json()
        )
        == 1
    )
