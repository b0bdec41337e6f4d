"""Structured capabilities, and POST /api/v1/executions: assignment by capability and load."""

from sqlalchemy import text

from tests.conftest import bearer, make_token

REFUND_INPUT = {"order": "A-17", "amount": "12.50"}


def agent_body(name, capabilities, schema=None):
    return {
        "name": name,
        "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
        "input_schema": schema or {"type": "object", "required": ["order"]},
        "capabilities": capabilities,
    }


def make_agent(client, org, name, capabilities, schema=None):
    response = client.post(
        "/api/v1/agents", json=agent_body(name, capabilities, schema), headers=org.headers
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def assign(client, org, capability="payments.refund", payload=None, **extra):
    return client.post(
        "/api/v1/executions",
        json={"capability": capability, "input": payload or REFUND_INPUT, **extra},
        headers=org.headers,
    )


def add_queued(connection, org, agent_name, count, minutes_ago):
    """`count` queued executions of the agent, submitted `minutes_ago` (its load)."""
    connection.execute(
        text(
            """
            INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version,
                                    status, priority, input, attempt, max_attempts, queue,
                                    queued_at)
            SELECT gen_random_uuid(), a.org_id, a.id, a.current_version_id, a.name, '1.0.0',
                   'queued', 5, '{}'::jsonb, 0, 1, 'default',
                   now() - make_interval(mins => :minutes_ago)
            FROM agents a, generate_series(1, :count)
            WHERE a.org_id = :org_id AND a.name = :name
            """
        ),
        {"org_id": org.id, "name": agent_name, "count": count, "minutes_ago": minutes_ago},
    )


# ---------------------------------------------------------------------------------------------
# Capabilities in the definition


def test_capabilities_may_be_names_or_objects_and_read_back_as_given(client, org):
    capabilities = [
        "nlp",
        {"name": "payments.refund", "providers": ["stripe"], "chains": ["base"]},
        {"name": "payments.report", "authority": "observe"},
    ]
    agent = make_agent(client, org, "refunder", capabilities)
    assert agent["capabilities"] == capabilities
    listed = client.get("/api/v1/agents?capability=payments.refund", headers=org.headers)
    assert [item["name"] for item in listed.get_json()] == ["refunder"]
    assert client.get("/api/v1/agents?capability=stripe", headers=org.headers).get_json() == []
    version = client.get("/api/v1/agents/refunder/versions/1.0.0", headers=org.headers)
    assert version.get_json()["capabilities"] == capabilities


def test_a_malformed_capability_is_422_by_pointer(client, org):
    cases = [
        ([{"name": "x", "authority": "everything"}], "/capabilities/0"),
        ([{"providers": ["stripe"]}], "/capabilities/0"),
        ([{"name": "x", "unknown": 1}], "/capabilities/0"),
        (["nlp", {"name": "nlp", "chains": ["base"]}], "/capabilities/1"),
        # Neither a name nor an object: the schema says so (no duplicate check trips on it).
        ([["nlp"], 4, {"name": ["x"]}, {"name": {"a": 1}}], "/capabilities/0"),
    ]
    for capabilities, pointer in cases:
        response = client.post(
            "/api/v1/agents", json=agent_body("bad", capabilities), headers=org.headers
        )
        body = response.get_json()
        assert response.status_code == 422, (capabilities, body)
        assert any(key.startswith(pointer) for key in body["errors"]), (capabilities, body)


def test_a_version_that_drops_a_provider_or_lowers_authority_is_a_breaking_change(client, org):
    make_agent(
        client, org, "refunder", [{"name": "payments.refund", "providers": ["stripe", "adyen"]}]
    )
    changed = client.patch(
        "/api/v1/agents/refunder",
        json={
            "capabilities": [
                {"name": "payments.refund", "providers": ["stripe"], "authority": "propose"}
            ]
        },
        headers=org.headers,
    )
    assert changed.status_code == 200, changed.get_json()
    new = changed.get_json()["current_version"]
    diff = client.get(
        f"/api/v1/agents/refunder/versions/{new}/diff?against=1.0.0", headers=org.headers
    ).get_json()
    reasons = {change["reason"] for change in diff["breaking"]}
    assert "'payments.refund' no longer offers provider 'adyen'" in reasons
    assert "'payments.refund' lowered authority execute -> propose" in reasons


# ---------------------------------------------------------------------------------------------
# Assignment


def test_the_least_loaded_agent_with_the_capability_runs_the_input(client, org, connection):
    for name in ("refund-a", "refund-b", "refund-c"):
        make_agent(client, org, name, ["payments.refund"])
    make_agent(client, org, "reporter", ["payments.report"])
    add_queued(connection, org, "refund-a", 3, minutes_ago=1)
    add_queued(connection, org, "refund-b", 1, minutes_ago=2)
    add_queued(connection, org, "refund-c", 2, minutes_ago=3)
    response = assign(client, org)
    body = response.get_json()
    assert response.status_code == 202, body
    assert body["agent_name"] == "refund-b" and body["status"] == "queued"
    assert body["assigned_by"] == {
        "capability": "payments.refund",
        "candidates": [
            {"agent": "refund-b", "load": 1},
            {"agent": "refund-c", "load": 2},
            {"agent": "refund-a", "load": 3},
        ],
    }
    read = client.get(f"/api/v1/executions/{body['id']}", headers=org.headers).get_json()
    assert read["assigned_by"] == body["assigned_by"] and read["input"] == REFUND_INPUT
    # Now refund-b and refund-c have 2 each: refund-c, given work longest ago, goes next.
    assert assign(client, org).get_json()["agent_name"] == "refund-c"


def test_equal_loads_take_turns(app, live_org):
    # Committed submits (each its own queued_at), on a queue no worker serves: loads only grow.
    client = app.test_client()
    for name in ("refund-a", "refund-b", "refund-c"):
        body = {**agent_body(name, ["payments.refund"]), "queue": "assignment-idle"}
        assert client.post("/api/v1/agents", json=body, headers=live_org.headers).status_code == 201
    # refund-c had work first: once every load is equal, it goes first (by name it would not).
    response = client.post(
        "/api/v1/agents/refund-c/executions", json={"input": REFUND_INPUT}, headers=live_org.headers
    )
    assert response.status_code == 202
    chosen = [assign(client, live_org).get_json()["agent_name"] for _ in range(6)]
    assert chosen == ["refund-a", "refund-b", "refund-c"] * 2, chosen


def test_an_agent_whose_schema_refuses_the_input_is_skipped(client, org, connection):
    strict = {"type": "object", "required": ["order", "currency"]}
    make_agent(client, org, "refund-strict", ["payments.refund"], schema=strict)
    make_agent(client, org, "refund-loose", ["payments.refund"])
    add_queued(connection, org, "refund-loose", 5, minutes_ago=1)
    body = assign(client, org).get_json()
    assert body["agent_name"] == "refund-loose"
    assert body["assigned_by"]["candidates"] == [{"agent": "refund-loose", "load": 5}]


def test_every_candidate_refusing_the_input_is_422_keyed_by_agent_and_stores_nothing(
    client, org, connection
):
    make_agent(client, org, "refund-a", ["payments.refund"])
    make_agent(
        client,
        org,
        "refund-b",
        ["payments.refund"],
        schema={
            "type": "object",
            "required": ["order"],
            "properties": {"order": {"type": "integer"}},
        },
    )
    response = assign(client, org, payload={"amount": "1"})
    body = response.get_json()
    assert response.status_code == 422, body
    assert set(body["errors"]) == {"refund-a", "refund-b"}
    assert "/input" in body["errors"]["refund-a"]
    count = connection.execute(
        text('SELECT count(*) FROM executions WHERE org_id = :org AND input = \'{"amount": "1"}\''),
        {"org": org.id},
    ).scalar()
    assert count == 0


def test_no_agent_with_the_capability_is_409_with_a_hint(client, org):
    make_agent(client, org, "reporter", ["payments.report"])
    response = assign(client, org)
    body = response.get_json()
    assert response.status_code == 409, body
    assert "payments.refund" in body["message"] and "capability=payments.refund" in body["hint"]


def test_provider_and_chain_narrow_the_candidates(client, org):
    make_agent(
        client,
        org,
        "refund-stripe",
        [{"name": "payments.refund", "providers": ["stripe"], "chains": ["base"]}],
    )
    make_agent(client, org, "refund-any", ["payments.refund"])
    body = assign(client, org, provider="stripe", chain="base").get_json()
    assert body["agent_name"] == "refund-stripe"
    assert [c["agent"] for c in body["assigned_by"]["candidates"]] == ["refund-stripe"]
    response = assign(client, org, provider="stripe", chain="polygon")
    assert response.status_code == 409
    assert "provider 'stripe' and chain 'polygon'" in response.get_json()["message"]


def test_archived_agents_are_not_candidates(client, org):
    make_agent(client, org, "refund-old", ["payments.refund"])
    make_agent(client, org, "refund-new", ["payments.refund"])
    assert client.delete("/api/v1/agents/refund-old", headers=org.headers).status_code == 204
    assert assign(client, org).get_json()["agent_name"] == "refund-new"


def test_another_organizations_agents_are_never_assigned(client, org, other_org):
    make_agent(client, other_org, "refund-theirs", ["payments.refund"])
    assert assign(client, org).status_code == 409
    make_agent(client, org, "refund-mine", ["payments.refund"])
    body = assign(client, org).get_json()
    assert body["agent_name"] == "refund-mine"
    assert [c["agent"] for c in body["assigned_by"]["candidates"]] == ["refund-mine"]
    assert (
        client.get(f"/api/v1/executions/{body['id']}", headers=other_org.headers).status_code == 404
    )


def test_a_viewer_may_not_assign(client, org):
    make_agent(client, org, "refund-a", ["payments.refund"])
    viewer = bearer(make_token(org, "viewer"))
    response = client.post(
        "/api/v1/executions",
        json={"capability": "payments.refund", "input": REFUND_INPUT},
        headers=viewer,
    )
    assert response.status_code == 403


def test_the_submit_audit_event_records_the_assignment(client, org):
    make_agent(client, org, "refund-a", ["payments.refund"])
    body = assign(client, org).get_json()
    events = client.get(
        "/api/v1/audit", query_string={"object_id": body["id"]}, headers=org.headers
    ).get_json()
    assert [event["action"] for event in events] == ["execution.submit"]
    assert events[0]["changes"] == [
        {"op": "add", "path": "/assigned_by", "value": body["assigned_by"]}
    ]


def test_an_observing_agent_that_could_move_money_is_never_assigned(client, org, connection):
    policy = {
        "max_per_transaction": "10",
        "max_per_day": "10",
        "currency": "USDC",
        "chains": ["base"],
    }
    observer = {"name": "payments.refund", "authority": "observe"}
    body = {**agent_body("refund-observer", [observer]), "wallet_policy": policy}
    assert client.post("/api/v1/agents", json=body, headers=org.headers).status_code == 201
    assert assign(client, org).status_code == 409
    # Observing without a wallet_policy moves no money: it may be assigned.
    make_agent(client, org, "refund-reader", [observer])
    make_agent(client, org, "refund-payer", ["payments.refund"])
    add_queued(connection, org, "refund-payer", 1, minutes_ago=1)
    body = assign(client, org).get_json()
    assert body["agent_name"] == "refund-reader", body
    assert [c["agent"] for c in body["assigned_by"]["candidates"]] == [
        "refund-reader",
        "refund-payer",
    ]
