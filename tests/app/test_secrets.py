"""Secrets over the API: write-only values, roles, tenancy, `$secret` references checked at
creation, literal config and header values masked for operator and viewer (no worker)."""

import dataclasses
import json

import pytest
from sqlalchemy import text

from app.config import current_config, use_config
from tests.conftest import bearer, make_token

VALUE = "sk-live-0123456789abcdef"
COMMAND = {"type": "command", "argv": ["python3", "-c", "pass"]}


def put(client, org, name, value=VALUE, headers=None):
    return client.put(
        f"/api/v1/secrets/{name}", json={"value": value}, headers=headers or org.headers
    )


def create_agent(client, org, name, **fields):
    body = {"name": name, "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}}
    return client.post("/api/v1/agents", json={**body, **fields}, headers=org.headers)


@pytest.fixture
def no_keys():
    """This process (the API of the test client) without RUNYARD_SECRET_KEYS."""
    configured = current_config()
    use_config(dataclasses.replace(configured, secret_keys=()))
    yield
    use_config(configured)


def test_put_answers_name_and_a_version_that_grows(client, org):
    first = put(client, org, "api-key")
    assert first.status_code == 200, first.get_json()
    body = first.get_json()
    assert set(body) == {"name", "version", "created_at", "updated_at"}
    assert body["name"] == "api-key" and body["version"] == 1
    second = put(client, org, "api-key", "another value").get_json()
    assert second["version"] == 2 and second["updated_at"] >= body["updated_at"]


def test_the_list_shows_names_and_metadata_never_values(client, org, connection):
    put(client, org, "b-key")
    put(client, org, "a-key")
    response = client.get("/api/v1/secrets", headers=org.headers)
    assert response.status_code == 200
    assert [item["name"] for item in response.get_json()] == ["a-key", "b-key"]
    assert json.loads(response.headers["X-Pagination"])["total"] == 2
    assert VALUE not in response.get_data(as_text=True)
    paged = client.get("/api/v1/secrets?page=2&page_size=1", headers=org.headers).get_json()
    assert [item["name"] for item in paged] == ["b-key"]
    # At rest: sealed, never the value (and not its base64 either).
    stored = connection.execute(text("SELECT sealed_value FROM secrets")).scalars().all()
    assert len(stored) == 2 and all(value.startswith("ry1.") for value in stored)
    assert not any(VALUE in value for value in stored)


def test_delete_is_204_then_404(client, org):
    put(client, org, "api-key")
    assert client.delete("/api/v1/secrets/api-key", headers=org.headers).status_code == 204
    again = client.delete("/api/v1/secrets/api-key", headers=org.headers)
    assert again.status_code == 404 and again.get_json()["hint"]
    assert client.get("/api/v1/secrets", headers=org.headers).get_json() == []


@pytest.mark.parametrize("role", ["operator", "viewer"])
def test_operator_and_viewer_may_not_put_or_delete(client, org, role):
    put(client, org, "api-key")
    headers = bearer(make_token(org, role))
    refused = put(client, org, "api-key", "mine now", headers=headers)
    assert refused.status_code == 403 and refused.get_json()["hint"]
    assert client.delete("/api/v1/secrets/api-key", headers=headers).status_code == 403
    listed = client.get("/api/v1/secrets", headers=headers).get_json()
    assert [(item["name"], item["version"]) for item in listed] == [("api-key", 1)]


def test_a_developer_may_put_and_delete(client, org):
    headers = bearer(make_token(org, "developer"))
    assert put(client, org, "api-key", headers=headers).status_code == 200
    assert client.delete("/api/v1/secrets/api-key", headers=headers).status_code == 204


def test_another_organization_neither_sees_nor_deletes_ours(client, org, other_org):
    put(client, org, "api-key")
    response = client.delete("/api/v1/secrets/api-key", headers=other_org.headers)
    assert response.status_code == 404
    assert client.get("/api/v1/secrets", headers=other_org.headers).get_json() == []
    # Its own secret of the same name is its own.
    assert put(client, other_org, "api-key").get_json()["version"] == 1
    assert put(client, org, "api-key").get_json()["version"] == 2


@pytest.mark.parametrize("name", ["Upper", "-dash-first", "a" * 64, "dot.ted"])
def test_bad_names_are_422(client, org, name):
    response = put(client, org, name)
    assert response.status_code == 422 and "name" in response.get_json()["errors"]


@pytest.mark.parametrize("body", [{}, {"value": ""}, {"value": 5}])
def test_a_missing_or_empty_value_is_422(client, org, body):
    response = client.put("/api/v1/secrets/api-key", json=body, headers=org.headers)
    assert response.status_code == 422


def test_without_a_key_a_put_is_503_with_a_hint(client, org, no_keys):
    response = put(client, org, "api-key")
    body = response.get_json()
    assert response.status_code == 503 and "RUNYARD_SECRET_KEYS" in body["hint"]


def test_a_ciphertext_moved_to_another_secret_does_not_open(client, org, connection):
    from app.secrets import services
    from app.secrets.crypto import KeyMissing

    put(client, org, "one", "first value")
    put(client, org, "two", "second value")
    assert services.values(connection, org.id, frozenset({"one"})) == {"one": "first value"}
    connection.execute(
        text(
            "UPDATE secrets SET sealed_value = (SELECT sealed_value FROM secrets WHERE name = "
            "'one' AND org_id = :org) WHERE name = 'two' AND org_id = :org"
        ),
        {"org": org.id},
    )
    with pytest.raises(KeyMissing, match="does not open"):
        services.values(connection, org.id, frozenset({"two"}))


# ---------------------------------------------------------------------------------------------
# References


@pytest.mark.parametrize(
    ("fields", "pointer"),
    [
        ({"config": {"api": {"key": {"$secret": "nope"}}}}, "/config/api/key"),
        ({"config": {"keys": ["x", {"$secret": "nope"}]}}, "/config/keys/1"),
        ({"runtime": {**COMMAND, "env": {"TOKEN": {"$secret": "nope"}}}}, "/runtime/env/TOKEN"),
        (
            {
                "runtime": {
                    "type": "http",
                    "url": "http://127.0.0.1:9/x",
                    "headers": {"Authorization": {"$secret": "nope"}},
                }
            },
            "/runtime/headers/Authorization",
        ),
    ],
    ids=["config", "config-list", "command-env", "http-header"],
)
def test_an_unknown_secret_is_422_at_creation_keyed_by_pointer(client, org, fields, pointer):
    response = create_agent(client, org, "uses-secret", **fields)
    body = response.get_json()
    assert response.status_code == 422, body
    assert list(body["errors"]) == [pointer] and "nope" in body["errors"][pointer][0]
    assert "PUT /api/v1/secrets" in body["hint"]
    put(client, org, "nope")
    assert create_agent(client, org, "uses-secret", **fields).status_code == 201


def test_an_unknown_secret_is_422_on_patch(client, org):
    assert create_agent(client, org, "agent").status_code == 201
    response = client.patch(
        "/api/v1/agents/agent", json={"config": {"k": {"$secret": "nope"}}}, headers=org.headers
    )
    assert response.status_code == 422 and list(response.get_json()["errors"]) == ["/config/k"]
    versions = client.get("/api/v1/agents/agent/versions", headers=org.headers).get_json()
    assert len(versions) == 1


def test_another_organizations_secret_is_unknown(client, org, other_org):
    put(client, other_org, "theirs")
    response = create_agent(client, org, "agent", config={"k": {"$secret": "theirs"}})
    assert response.status_code == 422


@pytest.mark.parametrize(
    "reference",
    [{"$secret": "ok", "extra": 1}, {"$secret": 5}, {"$secret": "Bad Name"}],
)
def test_malformed_references_are_422(client, org, reference):
    put(client, org, "ok")
    response = create_agent(client, org, "agent", config={"k": reference})
    assert response.status_code == 422 and list(response.get_json()["errors"]) == ["/config/k"]


def test_a_reference_in_an_env_value_must_be_exactly_one(client, org):
    put(client, org, "ok")
    runtime = {**COMMAND, "env": {"TOKEN": {"$secret": "ok", "x": 1}}}
    response = create_agent(client, org, "agent", runtime=runtime)
    assert response.status_code == 422 and "/runtime/env/TOKEN" in response.get_json()["errors"]


# ---------------------------------------------------------------------------------------------
# Masking for operator and viewer


def _masked_agent(client, org):
    put(client, org, "api-key")
    runtime = {
        "type": "http",
        "url": "http://127.0.0.1:9/x",
        "headers": {"X-Plain": "plain-header-value", "Authorization": {"$secret": "api-key"}},
    }
    config = {
        "region": "eu-west-1",
        "nested": {"n": 3, "list": ["a"]},
        "key": {"$secret": "api-key"},
    }
    response = create_agent(client, org, "caller", runtime=runtime, config=config)
    assert response.status_code == 201, response.get_json()
    return runtime, config


@pytest.mark.parametrize("role", ["operator", "viewer"])
def test_literal_config_and_header_values_are_masked_for_operator_and_viewer(client, org, role):
    _masked_agent(client, org)
    headers = bearer(make_token(org, role))
    masked_config = {
        "region": "***",
        "nested": {"n": "***", "list": ["***"]},
        "key": {"$secret": "api-key"},
    }
    masked_headers = {"X-Plain": "***", "Authorization": {"$secret": "api-key"}}
    shown = [
        client.get("/api/v1/agents/caller", headers=headers).get_json(),
        client.get("/api/v1/agents", headers=headers).get_json()[0],
        client.get("/api/v1/agents/caller/versions", headers=headers).get_json()[0],
        client.get("/api/v1/agents/caller/versions/1.0.0", headers=headers).get_json(),
    ]
    for body in shown:
        assert body["config"] == masked_config
        assert body["runtime"]["headers"] == masked_headers
        assert body["runtime"]["url"] == "http://127.0.0.1:9/x"
    for path in ("/api/v1/agents", "/api/v1/agents/caller/versions"):
        text_of = client.get(path, headers=headers).get_data(as_text=True)
        assert "plain-header-value" not in text_of and "eu-west-1" not in text_of


@pytest.mark.parametrize("role", ["admin", "developer"])
def test_admin_and_developer_see_literal_values_and_references(client, org, role):
    runtime, config = _masked_agent(client, org)
    headers = org.headers if role == "admin" else bearer(make_token(org, role))
    body = client.get("/api/v1/agents/caller", headers=headers).get_json()
    assert body["config"] == config and body["runtime"]["headers"] == runtime["headers"]
    assert VALUE not in json.dumps(body)


def test_a_patch_answer_is_masked_for_nobody_who_may_patch(client, org):
    _masked_agent(client, org)
    response = client.patch(
        "/api/v1/agents/caller", json={"config": {"region": "us"}}, headers=org.headers
    )
    assert response.status_code == 200 and response.get_json()["config"] == {"region": "us"}
