"""An agent's own flow control fields, `concurrency` and `rate_limit`: accepted, stored in the
version, read back, refused with a pointer and a hint, and versioned like the rest."""

import uuid

import pytest

from app.executions.spec import key_value

RUNTIME = {"type": "python", "entrypoint": "tests.agents:echo"}
CONCURRENCY = {"limit": 2, "key": "$.input.customer_id", "on_limit": "cancel_running"}
RATE_LIMIT = {"limit": 10, "period_seconds": 60, "key": "$.input.account.id"}


def create(client, org, name="limited", **fields):
    return client.post(
        "/api/v1/agents", json={"name": name, "runtime": RUNTIME, **fields}, headers=org.headers
    )


def patch(client, org, body, name="limited"):
    return client.patch(f"/api/v1/agents/{name}", json=body, headers=org.headers)


def read(client, org, path="limited"):
    response = client.get(f"/api/v1/agents/{path}", headers=org.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_both_fields_are_stored_and_read_back_on_the_agent_and_its_version(client, org):
    response = create(client, org, concurrency=CONCURRENCY, rate_limit=RATE_LIMIT)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["concurrency"] == CONCURRENCY and body["rate_limit"] == RATE_LIMIT
    assert read(client, org)["concurrency"] == CONCURRENCY
    version = read(client, org, "limited/versions/1.0.0")
    assert version["concurrency"] == CONCURRENCY and version["rate_limit"] == RATE_LIMIT
    listed = client.get("/api/v1/agents/limited/versions", headers=org.headers).get_json()
    assert listed[0]["rate_limit"] == RATE_LIMIT
    assert client.get("/api/v1/agents", headers=org.headers).get_json()[0]["concurrency"] == (
        CONCURRENCY
    )


def test_unset_reads_null_and_on_limit_defaults_to_queue(client, org):
    assert create(client, org).status_code == 201
    body = read(client, org)
    assert body["concurrency"] is None and body["rate_limit"] is None
    assert read(client, org, "limited/versions/1.0.0")["concurrency"] is None
    response = create(
        client,
        org,
        name="keyless",
        concurrency={"limit": 1},
        rate_limit={"limit": 5, "period_seconds": 0.5},
    )
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    # No key: one group for the agent; the key stays absent rather than null.
    assert body["concurrency"] == {"limit": 1, "on_limit": "queue"}
    assert body["rate_limit"] == {"limit": 5, "period_seconds": 0.5}


def test_what_is_stored_is_what_the_gates_read(client, org, connection):
    from sqlalchemy import text

    assert create(client, org, concurrency={"limit": 3, "key": "$.input.a.b"}).status_code == 201
    stored = connection.execute(
        text(
            "SELECT v.concurrency, v.rate_limit FROM agent_versions v "
            "JOIN agents a ON a.id = v.agent_id WHERE a.name = 'limited'"
        )
    ).one()
    assert stored.concurrency == {"limit": 3, "key": "$.input.a.b", "on_limit": "queue"}
    assert stored.rate_limit is None
    assert key_value(stored.concurrency, {"a": {"b": "x"}}) == '"x"'
    keyless = {"limit": 1, "on_limit": "queue"}
    assert key_value(keyless, {"a": 1}) == "null"


@pytest.mark.parametrize(
    ("fields", "pointer"),
    [
        ({"concurrency": {"limit": 0}}, "/concurrency/limit"),
        ({"concurrency": {"limit": 10001}}, "/concurrency/limit"),
        ({"concurrency": {"limit": 2.5}}, "/concurrency/limit"),
        ({"concurrency": {"limit": "2"}}, "/concurrency/limit"),
        ({"concurrency": {"limit": True}}, "/concurrency/limit"),
        ({"concurrency": {}}, "/concurrency/limit"),
        ({"concurrency": {"limit": 1, "on_limit": "drop"}}, "/concurrency/on_limit"),
        ({"concurrency": {"limit": 1, "colour": "red"}}, "/concurrency/colour"),
        ({"concurrency": 3}, "/concurrency"),
        ({"rate_limit": {"limit": 0, "period_seconds": 1}}, "/rate_limit/limit"),
        ({"rate_limit": {"limit": 1}}, "/rate_limit/period_seconds"),
        ({"rate_limit": {"limit": 1, "period_seconds": 0}}, "/rate_limit/period_seconds"),
        ({"rate_limit": {"limit": 1, "period_seconds": -5}}, "/rate_limit/period_seconds"),
        ({"rate_limit": {"limit": 1, "period_seconds": 86401}}, "/rate_limit/period_seconds"),
        ({"rate_limit": {"limit": 1, "period_seconds": "60"}}, "/rate_limit/period_seconds"),
        ({"rate_limit": {"period_seconds": 1}}, "/rate_limit/limit"),
    ],
)
def test_bad_values_are_422_with_a_pointer_and_a_hint(client, org, fields, pointer):
    response = create(client, org, **fields)
    body = response.get_json()
    assert response.status_code == 422, body
    assert body["code"] == 422 and body["status"] == "Unprocessable Entity" and body["message"]
    assert pointer in body["errors"], body["errors"]
    assert body["hint"]
    assert client.get("/api/v1/agents", headers=org.headers).get_json() == []


@pytest.mark.parametrize(
    "key",
    [
        "$.input",
        "customer_id",
        "$.steps.a.output",
        "$.input.",
        "$.input..a",
        "$.input.a b",
        "$.input.a[0]",
        "$.input.a\n",
        "$.input.é",
        "$.input." + "a" * 300,
    ],
)
@pytest.mark.parametrize("field", ["concurrency", "rate_limit"])
def test_a_key_must_be_an_input_reference_and_the_error_says_so(client, org, field, key):
    value = {"limit": 1, "key": key, **({"period_seconds": 1} if field == "rate_limit" else {})}
    response = create(client, org, **{field: value})
    body = response.get_json()
    assert response.status_code == 422, body
    [message] = body["errors"][f"/{field}/key"]
    assert '"$.input" followed by one or more ".name" segments' in message
    assert "concurrency is" in body["hint"]


@pytest.mark.parametrize("key", ["$.input.customer_id", "$.input.a.b-c.D_9", "$.input.0"])
def test_good_keys_are_taken(client, org, key):
    response = create(client, org, concurrency={"limit": 1, "key": key})
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["concurrency"]["key"] == key


def test_every_problem_is_reported_at_once(client, org):
    response = create(
        client,
        org,
        timeout_seconds=0,
        concurrency={"limit": 0, "key": "customer"},
        rate_limit={"limit": 1, "period_seconds": 0, "key": "$.input.x"},
    )
    errors = response.get_json()["errors"]
    assert response.status_code == 422
    assert {
        "/timeout_seconds",
        "/concurrency/limit",
        "/concurrency/key",
        "/rate_limit/period_seconds",
    } <= set(errors)
    assert "/rate_limit/key" not in errors


def test_a_change_of_only_concurrency_makes_a_new_version(client, org):
    assert create(client, org, concurrency={"limit": 2}).status_code == 201
    same = patch(client, org, {"concurrency": {"limit": 2, "on_limit": "queue"}})
    assert same.status_code == 200 and same.get_json()["current_version"] == "1.0.0"
    changed = patch(client, org, {"concurrency": {"limit": 3}})
    assert changed.status_code == 200, changed.get_json()
    assert changed.get_json()["current_version"] == "1.0.1"
    assert changed.get_json()["concurrency"] == {"limit": 3, "on_limit": "queue"}
    keyed = patch(client, org, {"concurrency": {"limit": 3, "key": "$.input.user"}})
    assert keyed.get_json()["current_version"] == "1.0.2"
    rejecting = patch(client, org, {"concurrency": {"limit": 3, "on_limit": "reject"}})
    # Replaced whole: the key given before is gone with it.
    assert rejecting.get_json()["concurrency"] == {"limit": 3, "on_limit": "reject"}
    assert rejecting.get_json()["current_version"] == "1.0.3"
    removed = patch(client, org, {"concurrency": None})
    assert removed.get_json()["concurrency"] is None
    assert removed.get_json()["current_version"] == "1.0.4"
    assert patch(client, org, {"concurrency": None}).get_json()["current_version"] == "1.0.4"
    first = read(client, org, "limited/versions/1.0.0")
    assert first["concurrency"] == {"limit": 2, "on_limit": "queue"}


def test_a_change_of_only_rate_limit_makes_a_new_version(client, org):
    assert create(client, org).status_code == 201
    added = patch(client, org, {"rate_limit": {"limit": 5, "period_seconds": 1}})
    assert added.get_json()["current_version"] == "1.0.1"
    # 1.0 and 1 are the same window: no new version.
    same = patch(client, org, {"rate_limit": {"limit": 5, "period_seconds": 1.0}})
    assert same.get_json()["current_version"] == "1.0.1"
    assert same.get_json()["rate_limit"] == {"limit": 5, "period_seconds": 1}
    numbered = patch(
        client, org, {"rate_limit": {"limit": 5, "period_seconds": 2}, "version": "2.0.0"}
    )
    assert numbered.get_json()["current_version"] == "2.0.0"
    bad = patch(client, org, {"rate_limit": {"limit": 5, "period_seconds": 0}})
    assert bad.status_code == 422 and "/rate_limit/period_seconds" in bad.get_json()["errors"]
    assert read(client, org)["current_version"] == "2.0.0"


def test_a_version_number_without_a_change_names_the_flow_fields(client, org):
    assert create(client, org, concurrency={"limit": 2}).status_code == 201
    response = patch(client, org, {"concurrency": {"limit": 2}, "version": "2.0.0"})
    assert response.status_code == 422
    assert "concurrency or rate_limit" in response.get_json()["errors"]["/version"][0]


def test_definitions_loaded_without_the_api_take_them_too(client, org, connection):
    """`runyard up`'s example agents (app/up.py) go through agents.ensure, not the API."""
    from app.agents import services
    from app.db import db
    from app.orgs.services import Principal

    principal = Principal(org.id, org.name, uuid.uuid4(), "examples", "admin")
    definition = {"name": "loaded", "runtime": RUNTIME, "rate_limit": RATE_LIMIT}
    with db.session() as session:
        services.ensure(session, principal, definition)
        again = services.ensure(session, principal, definition)
        assert again.current_version == "1.0.0"
        changed = services.ensure(session, principal, {**definition, "concurrency": {"limit": 1}})
        assert changed.current_version == "1.0.1"
        session.commit()
    assert read(client, org, "loaded")["concurrency"] == {"limit": 1, "on_limit": "queue"}


def test_the_openapi_document_describes_both_fields(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    for name in ("AgentCreate", "AgentPatch", "Agent", "AgentVersion"):
        assert {"concurrency", "rate_limit"} <= set(schemas[name]["properties"]), name
    concurrency = schemas["Concurrency"]["properties"]
    assert concurrency["on_limit"]["enum"] == ["queue", "cancel_running", "reject"]
    assert concurrency["limit"]["maximum"] == 10000 and concurrency["key"]["description"]
    assert schemas["RateLimit"]["required"] == ["limit", "period_seconds"]
