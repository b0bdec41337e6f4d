"""Agents and versions through the API: create, list, read, patch, archive, and every refusal."""

import dataclasses
import json

import pytest

SCHEMA_IN = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
SCHEMA_OUT = {
    "type": "object",
    "required": ["summary"],
    "properties": {"summary": {"type": "string"}},
}


def agent(name="summarize-ticket", **overrides):
    body = {
        "name": name,
        "description": "Summarize a support ticket",
        "runtime": {"type": "python", "entrypoint": "runyard_examples.text:summarize"},
        "input_schema": SCHEMA_IN,
        "output_schema": SCHEMA_OUT,
        "timeout_seconds": 60,
        "retry": {"max_retries": 2},
        "capabilities": ["nlp"],
        "tags": ["support"],
        "config": {"max_sentences": 1},
    }
    body.update(overrides)
    return body


def create(client, org, **overrides):
    response = client.post("/api/v1/agents", json=agent(**overrides), headers=org.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_create_returns_the_agent_and_version_1_0_0(client, org):
    body = create(client, org)
    assert body["current_version"] == "1.0.0"
    assert body["name"] == "summarize-ticket"
    assert body["input_schema"] == SCHEMA_IN and body["output_schema"] == SCHEMA_OUT
    assert body["retry"]["max_retries"] == 2 and body["retry"]["retry_on"]
    assert body["queue"] == "default" and body["limits"] == {}
    for field in ("id", "created_at", "updated_at"):
        assert body[field]
    read = client.get(f"/api/v1/agents/{body['id']}", headers=org.headers).get_json()
    assert read == client.get("/api/v1/agents/summarize-ticket", headers=org.headers).get_json()
    assert read["id"] == body["id"]


def test_defaults_for_a_minimal_agent(client, org):
    response = client.post(
        "/api/v1/agents",
        json={"name": "tiny", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}},
        headers=org.headers,
    )
    body = response.get_json()
    assert response.status_code == 201
    assert body["timeout_seconds"] == 300
    assert body["retry"]["max_retries"] == 0
    assert body["input_schema"] == {"type": "object"}


def test_duplicate_name_is_409(client, org):
    create(client, org)
    response = client.post("/api/v1/agents", json=agent(), headers=org.headers)
    assert response.status_code == 409
    assert response.get_json()["hint"]


@pytest.mark.parametrize(
    ("overrides", "pointer"),
    [
        ({"name": "Bad Name"}, "/name"),
        ({"runtime": {"type": "python"}}, "/runtime"),
        ({"runtime": {"type": "python", "entrypoint": "no-colon"}}, "/runtime/entrypoint"),
        ({"runtime": {"type": "cobol"}}, "/runtime/type"),
        ({"runtime": {"type": "script", "language": "python"}}, "/runtime"),
        ({"timeout_seconds": 0}, "/timeout_seconds"),
        ({"timeout_seconds": 86401}, "/timeout_seconds"),
        ({"timeout_seconds": "60"}, "/timeout_seconds"),
        ({"retry": {"max_retries": 21}}, "/retry/max_retries"),
        ({"retry": {"retry_on": ["output_invalid"]}}, "/retry/retry_on/0"),
        ({"limits": {"memory_mb": 1}}, "/limits/memory_mb"),
        ({"limits": {"disk": 1}}, "/limits"),
        ({"queue": "Bad Queue"}, "/queue"),
        ({"input_schema": {"type": "strin"}}, "/input_schema/type"),
        (
            {"output_schema": {"type": "object", "properties": {"a": {"minLength": -1}}}},
            "/output_schema/properties/a/minLength",
        ),
        ({"input_schema": {"$ref": "https://example.com/schema.json"}}, "/input_schema/$ref"),
        ({"input_schema": {"$ref": "#/$defs/missing"}}, "/input_schema/$ref"),
        ({"runtime": {"type": "python", "entrypoint": "os:system"}}, "/runtime/entrypoint"),
        ({"id": "6f1c3c52-7c3f-4c55-8c55-7d7f0c1b2b3c"}, "/id"),
        ({"status": "succeeded"}, "/status"),
        ({"created_at": "2020-01-01T00:00:00Z"}, "/created_at"),
        ({"colour": "blue"}, "/colour"),
    ],
)
def test_invalid_definitions_are_422_with_a_pointer(client, org, overrides, pointer):
    response = client.post("/api/v1/agents", json=agent(**overrides), headers=org.headers)
    body = response.get_json()
    assert response.status_code == 422, body
    assert body["code"] == 422 and body["status"] == "Unprocessable Entity" and body["message"]
    assert pointer in body["errors"], body["errors"]
    assert client.get("/api/v1/agents", headers=org.headers).get_json() == []


def test_server_owned_fields_say_so(client, org):
    response = client.post("/api/v1/agents", json=agent(org_id="x"), headers=org.headers)
    assert response.get_json()["errors"]["/org_id"] == [
        "Server-owned field: set by Runyard, not by the client."
    ]


def test_schema_size_and_depth_are_bounded(client, org):
    deep: dict = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"x": deep}}
    response = client.post("/api/v1/agents", json=agent(input_schema=deep), headers=org.headers)
    assert response.status_code == 422
    assert "deeply" in response.get_json()["message"]
    huge = {"type": "object", "description": "x" * 70_000}
    response = client.post("/api/v1/agents", json=agent(input_schema=huge), headers=org.headers)
    assert response.status_code == 422
    assert "too large" in response.get_json()["message"]


def test_list_filters_and_pagination(client, org):
    create(client, org, name="summarize-ticket", tags=["support"], capabilities=["nlp"])
    create(
        client,
        org,
        name="invoice-total",
        description="Totals invoices",
        tags=["finance"],
        capabilities=[],
    )
    create(
        client,
        org,
        name="translate",
        description="Translate tickets to English",
        tags=["support"],
        capabilities=["nlp", "translation"],
    )

    def names(query):
        response = client.get(f"/api/v1/agents{query}", headers=org.headers)
        assert response.status_code == 200
        return sorted(a["name"] for a in response.get_json())

    assert names("") == ["invoice-total", "summarize-ticket", "translate"]
    assert names("?tag=support") == ["summarize-ticket", "translate"]
    assert names("?capability=translation") == ["translate"]
    assert names("?q=invoice") == ["invoice-total"]
    assert names("?q=ticket") == ["summarize-ticket", "translate"]
    assert names("?q=transl") == ["translate"]
    assert names("?q=nothing-like-it") == []
    response = client.get("/api/v1/agents?page=2&page_size=2", headers=org.headers)
    assert len(response.get_json()) == 1
    pagination = json.loads(response.headers["X-Pagination"])
    assert pagination["total"] == 3 and pagination["total_pages"] == 2
    assert pagination["page"] == 2 and pagination["previous_page"] == 1
    assert client.get("/api/v1/agents?page_size=101", headers=org.headers).status_code == 422
    assert client.get("/api/v1/agents?page=0", headers=org.headers).status_code == 422


def test_patch_description_and_tags_change_in_place(client, org):
    create(client, org)
    response = client.patch(
        "/api/v1/agents/summarize-ticket",
        json={"description": "New words", "tags": ["triage"]},
        headers=org.headers,
    )
    body = response.get_json()
    assert response.status_code == 200
    assert body["description"] == "New words" and body["tags"] == ["triage"]
    assert body["current_version"] == "1.0.0"
    versions = client.get("/api/v1/agents/summarize-ticket/versions", headers=org.headers)
    assert [v["version"] for v in versions.get_json()] == ["1.0.0"]


def test_patch_of_versioned_fields_makes_new_immutable_versions(client, org):
    create(client, org)
    changed = client.patch(
        "/api/v1/agents/summarize-ticket",
        json={"config": {"max_sentences": 3}},
        headers=org.headers,
    ).get_json()
    assert changed["current_version"] == "1.0.1"
    assert changed["config"] == {"max_sentences": 3}
    same = client.patch(
        "/api/v1/agents/summarize-ticket",
        json={"config": {"max_sentences": 3}},
        headers=org.headers,
    ).get_json()
    assert same["current_version"] == "1.0.1"
    bumped = client.patch(
        "/api/v1/agents/summarize-ticket",
        json={"timeout_seconds": 120, "version": "2.0.0"},
        headers=org.headers,
    ).get_json()
    assert bumped["current_version"] == "2.0.0"
    versions = client.get(
        "/api/v1/agents/summarize-ticket/versions", headers=org.headers
    ).get_json()
    assert [v["version"] for v in versions] == ["2.0.0", "1.0.1", "1.0.0"]
    first = client.get(
        "/api/v1/agents/summarize-ticket/versions/1.0.0", headers=org.headers
    ).get_json()
    assert first["config"] == {"max_sentences": 1} and first["timeout_seconds"] == 60
    assert first["runtime"] == agent()["runtime"]
    missing = client.get("/api/v1/agents/summarize-ticket/versions/9.9.9", headers=org.headers)
    assert missing.status_code == 404


def test_patch_version_must_grow_and_be_semver(client, org):
    create(client, org)
    lower = client.patch(
        "/api/v1/agents/summarize-ticket",
        json={"timeout_seconds": 10, "version": "0.9.0"},
        headers=org.headers,
    )
    assert lower.status_code == 422 and "/version" in lower.get_json()["errors"]
    malformed = client.patch(
        "/api/v1/agents/summarize-ticket",
        json={"timeout_seconds": 10, "version": "v2"},
        headers=org.headers,
    )
    assert malformed.status_code == 422 and "/version" in malformed.get_json()["errors"]
    renamed = client.patch(
        "/api/v1/agents/summarize-ticket", json={"name": "other"}, headers=org.headers
    )
    assert renamed.status_code == 422 and "/name" in renamed.get_json()["errors"]


def test_archive_keeps_it_readable_and_refuses_new_executions(client, org):
    create(client, org)
    execution = client.post(
        "/api/v1/agents/summarize-ticket/executions",
        json={"input": {"text": "hi"}},
        headers=org.headers,
    ).get_json()
    response = client.delete("/api/v1/agents/summarize-ticket", headers=org.headers)
    assert response.status_code == 204
    assert client.get("/api/v1/agents", headers=org.headers).get_json() == []
    archived = client.get("/api/v1/agents?archived=true", headers=org.headers).get_json()
    assert archived[0]["archived_at"]
    assert client.get("/api/v1/agents/summarize-ticket", headers=org.headers).status_code == 200
    refused = client.post(
        "/api/v1/agents/summarize-ticket/executions",
        json={"input": {"text": "hi"}},
        headers=org.headers,
    )
    assert refused.status_code == 409
    old = client.get(f"/api/v1/executions/{execution['id']}", headers=org.headers)
    assert old.status_code == 200
    patched = client.patch(
        "/api/v1/agents/summarize-ticket", json={"description": "x"}, headers=org.headers
    )
    assert patched.status_code == 409


def test_unknown_agent_is_404(client, org):
    response = client.get("/api/v1/agents/nobody", headers=org.headers)
    assert response.status_code == 404
    assert response.get_json()["hint"]
    assert (
        client.get(
            "/api/v1/agents/6f1c3c52-7c3f-4c55-8c55-7d7f0c1b2b3c", headers=org.headers
        ).status_code
        == 404
    )


def test_every_problem_of_a_definition_is_reported_at_once(client, org):
    body = agent(
        name="Bad Name",
        runtime={"type": "python", "entrypoint": "os:system"},
        input_schema={"type": "strin"},
    )
    response = client.post("/api/v1/agents", json=body, headers=org.headers)
    errors = response.get_json()["errors"]
    assert response.status_code == 422
    assert {"/name", "/runtime/entrypoint", "/input_schema/type"} <= set(errors)


def test_a_script_that_does_not_compile_is_refused(client, org):
    body = agent(runtime={"type": "script", "language": "python", "source": "def main(:\n"})
    response = client.post("/api/v1/agents", json=body, headers=org.headers)
    assert response.status_code == 422
    assert response.get_json()["errors"]["/runtime/source"][0].startswith("line 1")


@pytest.fixture
def longest_timeout_600():
    from app.config import current_config, use_config

    cfg = current_config()
    use_config(dataclasses.replace(cfg, max_timeout_seconds=600))
    yield
    use_config(cfg)


def test_a_timeout_above_the_installations_longest_is_refused(client, org, longest_timeout_600):
    response = client.post("/api/v1/agents", json=agent(timeout_seconds=601), headers=org.headers)
    assert response.status_code == 422
    body = response.get_json()
    assert body["errors"] == {"/timeout_seconds": ["at most 600"]}
    assert "RUNYARD_MAX_TIMEOUT_SECONDS" in body["hint"]
    create(client, org, timeout_seconds=600)
    patched = client.patch(
        "/api/v1/agents/summarize-ticket", json={"timeout_seconds": 601}, headers=org.headers
    )
    assert patched.status_code == 422
    assert patched.get_json()["errors"] == {"/timeout_seconds": ["at most 600"]}
