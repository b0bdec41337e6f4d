"""Chains through the API without a worker: definitions, versions and every check at creation."""

import copy

from sqlalchemy import text

OBJECT_IN = {
    "type": "object",
    "required": ["value"],
    "properties": {"value": {"type": "integer"}, "by": {"type": "integer"}},
}
OBJECT_OUT = {"type": "object", "required": ["value"], "properties": {"value": {"type": "integer"}}}
AGENTS = [
    {
        "name": "adder",
        "runtime": {"type": "python", "entrypoint": "tests.agents:add"},
        "input_schema": OBJECT_IN,
        "output_schema": OBJECT_OUT,
    },
    {
        "name": "texter",
        "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
        "input_schema": {
            "type": "object",
            "required": ["text"],
            "properties": {"text": {"type": "string"}},
        },
        "output_schema": {
            "type": "object",
            "required": ["echo"],
            "properties": {"echo": {"type": "object"}, "note": {"type": "string"}},
        },
    },
]
CHAIN = {
    "name": "sums",
    "input_schema": OBJECT_IN,
    "steps": [
        {"name": "first", "agent": "adder"},
        {"name": "second", "agent": "adder", "input": {"value": "$.steps.first.output.value"}},
    ],
}


def make_agents(client, org):
    for body in AGENTS:
        response = client.post("/api/v1/agents", json=body, headers=org.headers)
        assert response.status_code == 201, response.get_json()


def create(client, org, body):
    return client.post("/api/v1/chains", json=body, headers=org.headers)


def with_steps(*steps, **extra):
    return {**copy.deepcopy(CHAIN), "steps": list(steps), **extra}


def assert_422(response, pointer, *words):
    body = response.get_json()
    assert response.status_code == 422, body
    assert pointer in body["errors"], body["errors"]
    text_ = " ".join(body["errors"][pointer]) + " " + body["message"]
    for word in words:
        assert word in text_, (word, body)
    return body


def test_create_read_list_and_version_a_chain(client, org):
    make_agents(client, org)
    response = create(client, org, CHAIN)
    assert response.status_code == 201, response.get_json()
    chain = response.get_json()
    assert chain["current_version"] == "1.0.0" and chain["on_failure"] == "stop"
    assert chain["steps"] == CHAIN["steps"]
    assert client.get("/api/v1/chains/sums", headers=org.headers).get_json()["id"] == chain["id"]
    listed = client.get("/api/v1/chains", headers=org.headers)
    assert [c["name"] for c in listed.get_json()] == ["sums"]
    assert '"total": 1' in listed.headers["X-Pagination"]

    assert create(client, org, CHAIN).status_code == 409
    same = client.patch("/api/v1/chains/sums", json={"description": "d"}, headers=org.headers)
    assert same.status_code == 200 and same.get_json()["current_version"] == "1.0.0"
    changed = client.patch(
        "/api/v1/chains/sums", json={"on_failure": "continue"}, headers=org.headers
    )
    assert changed.get_json()["current_version"] == "1.0.1"
    versions = client.get("/api/v1/chains/sums/versions", headers=org.headers).get_json()
    assert [v["version"] for v in versions] == ["1.0.1", "1.0.0"]
    first = client.get("/api/v1/chains/sums/versions/1.0.0", headers=org.headers).get_json()
    assert first["on_failure"] == "stop"
    assert client.get("/api/v1/chains/sums/versions/9.9.9", headers=org.headers).status_code == 404
    bad_patch = client.patch(
        "/api/v1/chains/sums",
        json={"steps": [{"name": "x", "agent": "nobody"}]},
        headers=org.headers,
    )
    assert_422(bad_patch, "/steps/0/agent", "'x'", "nobody")
    assert client.delete("/api/v1/chains/sums", headers=org.headers).status_code == 204
    archived = client.post(
        "/api/v1/chains/sums/executions", json={"input": {"value": 1}}, headers=org.headers
    )
    assert archived.status_code == 409 and archived.get_json()["hint"]


def test_unknown_agent_or_version_names_the_step(client, org):
    make_agents(client, org)
    assert_422(
        create(
            client,
            org,
            with_steps({"name": "a", "agent": "adder"}, {"name": "b", "agent": "ghost"}),
        ),
        "/steps/1/agent",
        "'b'",
        "ghost",
    )
    assert_422(
        create(client, org, with_steps({"name": "a", "agent": "adder", "version": "2.0.0"})),
        "/steps/0/version",
        "'a'",
        "2.0.0",
    )
    assert_422(
        create(
            client,
            org,
            with_steps({"name": "a", "agent": "adder", "compensate": {"agent": "ghost"}}),
        ),
        "/steps/0/compensate/agent",
        "ghost",
    )


def test_references_must_name_an_earlier_step(client, org):
    make_agents(client, org)
    unknown = with_steps(
        {"name": "a", "agent": "adder"},
        {"name": "b", "agent": "adder", "input": {"value": "$.steps.nope.output.value"}},
    )
    assert_422(create(client, org, unknown), "/steps/1/input/value", "'b'", "unknown step 'nope'")
    later = with_steps(
        {"name": "a", "agent": "adder", "input": {"value": "$.steps.b.output.value"}},
        {"name": "b", "agent": "adder"},
    )
    assert_422(create(client, org, later), "/steps/0/input/value", "'a'", "'b'")
    sibling = with_steps(
        {
            "name": "fan",
            "parallel": [
                {"name": "x", "agent": "adder"},
                {"name": "y", "agent": "adder", "input": {"value": "$.steps.x.output.value"}},
            ],
        }
    )
    assert_422(create(client, org, sibling), "/steps/0/parallel/1/input/value", "'y'", "'x'")
    undo = {"name": "undo", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}}
    assert client.post("/api/v1/agents", json=undo, headers=org.headers).status_code == 201
    own = {"compensate": {"agent": "undo", "input": {"mine": "$.steps.y.output.value"}}}
    sibling_compensation = with_steps(
        {"name": "a", "agent": "adder"},
        {
            "name": "fan",
            "parallel": [
                {"name": "x", "agent": "adder"},
                {
                    "name": "y",
                    "agent": "adder",
                    "compensate": {
                        "agent": "undo",
                        "input": {
                            "mine": "$.steps.y.output.value",
                            "before": "$.steps.a.output.value",
                            "sibling": "$.steps.x.output.value",
                        },
                    },
                },
            ],
        },
    )
    assert_422(
        create(client, org, sibling_compensation),
        "/steps/1/parallel/1/compensate/input/sibling",
        "compensation of step 'y'",
        "'x'",
    )
    fine = with_steps(
        {"name": "a", "agent": "adder"},
        {"name": "fan", "parallel": [{"name": "x", "agent": "adder"}, {"name": "y", **own}]},
    )
    fine["steps"][1]["parallel"][1]["agent"] = "adder"
    assert create(client, org, fine).status_code == 201, "its own output may be read"
    malformed = with_steps({"name": "a", "agent": "adder", "input": {"value": "$.outputs.a"}})
    assert_422(create(client, org, malformed), "/steps/0/input/value", "not a reference")


def test_duplicate_step_names(client, org):
    make_agents(client, org)
    body = with_steps(
        {"name": "a", "agent": "adder"},
        {"name": "par", "parallel": [{"name": "a", "agent": "adder"}]},
    )
    assert_422(create(client, org, body), "/steps/1/parallel/0/name", "'a'", "twice")


def test_a_whole_output_must_guarantee_the_required_input(client, org):
    make_agents(client, org)
    # adder's output has no `text`: passing it whole to texter cannot work.
    body = with_steps({"name": "a", "agent": "adder"}, {"name": "b", "agent": "texter"})
    assert_422(create(client, org, body), "/steps/1", "'b'", "'a'", "required field 'text'")
    # The chain input itself must fit the first step.
    first = {**with_steps({"name": "t", "agent": "texter"}), "input_schema": {"type": "object"}}
    assert_422(create(client, org, first), "/steps/0", "'t'", "'text'")
    # After a parallel group the next step gets an object keyed by the group's steps.
    fan = with_steps(
        {
            "name": "fan",
            "parallel": [{"name": "x", "agent": "adder"}, {"name": "y", "agent": "adder"}],
        },
        {"name": "z", "agent": "adder"},
    )
    assert_422(create(client, org, fan), "/steps/1", "'z'", "'value'")


def test_incompatible_types_name_the_field(client, org):
    make_agents(client, org)
    body = with_steps(
        {"name": "t", "agent": "texter", "input": {"text": "hello"}},
        {"name": "n", "agent": "adder", "input": {"value": "$.steps.t.output.note"}},
    )
    response = assert_422(create(client, org, body), "/steps/1/input/value", "'n'", "string")
    assert "integer" in " ".join(response["errors"]["/steps/1/input/value"])
    literal = with_steps({"name": "a", "agent": "adder", "input": {"value": "ten"}})
    assert_422(create(client, org, literal), "/steps/0/input/value", "'a'", "literal")
    missing = with_steps({"name": "a", "agent": "adder", "input": {"by": 2}})
    assert_422(create(client, org, missing), "/steps/0/input", "'value'", "not given")
    undeclared = with_steps(
        {"name": "a", "agent": "adder", "input": {"value": "$.input.nothing"}},
        input_schema={"type": "object", "additionalProperties": False},
    )
    assert_422(create(client, org, undeclared), "/steps/0/input/value", "does not have")


def test_compatible_chains_pass(client, org):
    make_agents(client, org)
    body = with_steps(
        {"name": "a", "agent": "adder"},
        {
            "name": "fan",
            "parallel": [
                {"name": "x", "agent": "adder"},
                {"name": "y", "agent": "adder", "input": {"value": "$.input.value", "by": 5}},
            ],
        },
        {"name": "z", "agent": "adder", "input": {"value": "$.steps.fan.output.y.value"}},
        {"name": "t", "agent": "texter", "input": {"text": "literal"}},
    )
    assert create(client, org, body).status_code == 201


def test_structure_is_checked_against_the_chain_schema(client, org):
    make_agents(client, org)
    response = create(client, org, with_steps({"name": "a"}))
    assert response.status_code == 422 and "/steps/0" in response.get_json()["errors"]
    assert create(client, org, with_steps()).status_code == 422
    assert create(client, org, {**CHAIN, "on_failure": "retry"}).status_code == 422
    assert create(client, org, {**CHAIN, "status": "running"}).status_code == 422


def test_submit_checks_the_input_and_stores_nothing_when_it_fails(client, org, connection):
    make_agents(client, org)
    create(client, org, CHAIN)
    response = client.post(
        "/api/v1/chains/sums/executions", json={"input": {"value": "x"}}, headers=org.headers
    )
    assert response.status_code == 422 and "/input/value" in response.get_json()["errors"]
    count = connection.execute(
        text("SELECT count(*) FROM chain_executions WHERE org_id = :org"), {"org": org.id}
    ).scalar()
    assert count == 0
    accepted = client.post(
        "/api/v1/chains/sums/executions", json={"input": {"value": 1}}, headers=org.headers
    )
    assert accepted.status_code == 202
    body = accepted.get_json()
    assert body["status"] == "queued" and body["chain_version"] == "1.0.0"
    assert [(s["name"], s["status"]) for s in body["steps"]] == [
        ("first", "pending"),
        ("second", "pending"),
    ]


def test_other_organizations_see_nothing(client, org, other_org):
    make_agents(client, org)
    create(client, org, CHAIN)
    submitted = client.post(
        "/api/v1/chains/sums/executions", json={"input": {"value": 1}}, headers=org.headers
    ).get_json()
    assert client.get("/api/v1/chains/sums", headers=other_org.headers).status_code == 404
    read = client.get(f"/api/v1/chain-executions/{submitted['id']}", headers=other_org.headers)
    assert read.status_code == 404
    cancel = client.post(
        f"/api/v1/chain-executions/{submitted['id']}/cancel", headers=other_org.headers
    )
    assert cancel.status_code == 404
    assert client.get("/api/v1/chain-executions", headers=other_org.headers).get_json() == []


def test_other_organizations_cannot_read_change_or_run_a_chain(client, org, other_org):
    make_agents(client, org)
    chain = create(client, org, CHAIN).get_json()
    for ref in ("sums", chain["id"]):
        for method, path, body in (
            ("get", f"/api/v1/chains/{ref}/versions", None),
            ("get", f"/api/v1/chains/{ref}/versions/1.0.0", None),
            ("patch", f"/api/v1/chains/{ref}", {"description": "mine now"}),
            ("delete", f"/api/v1/chains/{ref}", None),
            ("post", f"/api/v1/chains/{ref}/executions", {"input": {"value": 1}}),
            ("get", f"/api/v1/chain-executions?chain={ref}", None),
        ):
            response = getattr(client, method)(path, json=body, headers=other_org.headers)
            assert response.status_code == 404, (method, path, response.get_json())
            assert response.get_json()["hint"], (method, path)
    # Untouched for its own organization.
    mine = client.get("/api/v1/chains/sums", headers=org.headers).get_json()
    assert mine["archived_at"] is None and mine["description"] == chain["description"]
    assert client.get("/api/v1/chain-executions", headers=org.headers).get_json() == []


def test_errors_of_chain_executions_carry_hints(client, org):
    make_agents(client, org)
    undo = {"name": "undo", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}}
    assert client.post("/api/v1/agents", json=undo, headers=org.headers).status_code == 201
    compensated = with_steps({"name": "a", "agent": "adder", "compensate": {"agent": "undo"}})
    assert create(client, org, compensated).status_code == 201
    assert client.delete("/api/v1/agents/undo", headers=org.headers).status_code == 204
    refused = client.post(
        "/api/v1/chains/sums/executions", json={"input": {"value": 1}}, headers=org.headers
    )
    body = refused.get_json()
    assert refused.status_code == 409 and "compensation of step 'a'" in body["message"], body
    assert "PATCH" in body["hint"]
    malformed = client.get("/api/v1/chain-executions/not-a-uuid", headers=org.headers)
    assert malformed.status_code == 404 and "UUID" in malformed.get_json()["hint"]
