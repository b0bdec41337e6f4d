"""Versions lifecycle through the API: rollback, diff, changelog, and the 409 (with `force`) on an
agent PATCH that would break an unpinned chain or a recently accepted input."""

import pytest
from sqlalchemy import text

from tests.conftest import bearer, make_token, wait_for

TEXT_IN = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
TEXT_OUT = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}


def create_agent(client, org, name="echo", **overrides):
    body = {
        "name": name,
        "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
        "input_schema": TEXT_IN,
        "output_schema": TEXT_OUT,
        "capabilities": ["v1"],
        "config": {"v": 1},
        **overrides,
    }
    response = client.post("/api/v1/agents", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def patch(client, org, path, body, code=200):
    response = client.patch(path, json=body, headers=org.headers)
    assert response.status_code == code, response.get_json()
    return response.get_json()


def versions(client, org, name="echo"):
    listed = client.get(f"/api/v1/agents/{name}/versions", headers=org.headers).get_json()
    return [v["version"] for v in listed]


# ---------------------------------------------------------------------------------------------
# Rollback


def test_rollback_makes_an_old_version_current_and_the_next_patch_follows_the_highest(client, org):
    create_agent(client, org)
    patch(client, org, "/api/v1/agents/echo", {"config": {"v": 2}, "capabilities": ["v2"]})
    response = client.post(
        "/api/v1/agents/echo/rollback", json={"version": "1.0.0"}, headers=org.headers
    )
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["current_version"] == "1.0.0"
    assert body["config"] == {"v": 1} and body["capabilities"] == ["v1"]
    assert versions(client, org) == ["1.0.1", "1.0.0"], "no version is made"
    # The capability filter reads the agent's copy of the current version's capabilities.
    found = client.get("/api/v1/agents?capability=v1", headers=org.headers).get_json()
    assert [a["name"] for a in found] == ["echo"]
    assert client.get("/api/v1/agents?capability=v2", headers=org.headers).get_json() == []
    [event] = client.get(
        "/api/v1/audit", query_string={"action": "agent.rollback"}, headers=org.headers
    ).get_json()
    changes = {(op["op"], op["path"]): op.get("value") for op in event["changes"]}
    assert changes[("replace", "/current_version")] == "1.0.0"
    assert changes[("replace", "/config/v")] == 1
    after = patch(client, org, "/api/v1/agents/echo", {"config": {"v": 3}})
    assert after["current_version"] == "1.0.2"
    assert versions(client, org) == ["1.0.2", "1.0.1", "1.0.0"]


def test_a_submit_right_after_a_rollback_runs_the_rolled_back_to_version(client, org):
    create_agent(client, org)
    patch(client, org, "/api/v1/agents/echo", {"config": {"v": 2}})
    submit = {"input": {"text": "hi"}}
    # The first submit fills the API's (org, agent, version) target cache with 1.0.1.
    first = client.post("/api/v1/agents/echo/executions", json=submit, headers=org.headers)
    assert first.get_json()["agent_version"] == "1.0.1"
    client.post("/api/v1/agents/echo/rollback", json={"version": "1.0.0"}, headers=org.headers)
    second = client.post("/api/v1/agents/echo/executions", json=submit, headers=org.headers)
    assert second.status_code == 202 and second.get_json()["agent_version"] == "1.0.0"


@pytest.mark.worker
def test_rollback_then_run_shows_the_old_versions_behaviour(live_client, live_org):
    client, org = live_client, live_org
    create_agent(client, org, name="rolled", output_schema={"type": "object"})
    patch(client, org, "/api/v1/agents/rolled", {"config": {"v": 2}})
    submit = {"input": {"text": "hi"}}
    newer = client.post("/api/v1/agents/rolled/executions", json=submit, headers=org.headers)
    done = wait_for(client, org, newer.get_json()["id"])
    assert done["status"] == "succeeded" and done["output"]["config"] == {"v": 2}, done
    rolled = client.post(
        "/api/v1/agents/rolled/rollback", json={"version": "1.0.0"}, headers=org.headers
    )
    assert rolled.status_code == 200, rolled.get_json()
    older = client.post("/api/v1/agents/rolled/executions", json=submit, headers=org.headers)
    done = wait_for(client, org, older.get_json()["id"])
    assert done["status"] == "succeeded", done
    assert done["agent_version"] == "1.0.0" and done["output"]["config"] == {"v": 1}


def test_rollback_refusals(client, org, other_org):
    create_agent(client, org)
    patch(client, org, "/api/v1/agents/echo", {"config": {"v": 2}})
    path = "/api/v1/agents/echo/rollback"
    unknown = client.post(path, json={"version": "9.9.9"}, headers=org.headers)
    assert unknown.status_code == 404 and "versions" in unknown.get_json()["hint"]
    for body in ({}, {"version": 1}, {"version": ""}, {"version": "1.0.0", "force": True}):
        assert client.post(path, json=body, headers=org.headers).status_code == 422, body
    viewer = bearer(make_token(org, "viewer"))
    assert client.post(path, json={"version": "1.0.0"}, headers=viewer).status_code == 403
    other = client.post(path, json={"version": "1.0.0"}, headers=other_org.headers)
    assert other.status_code == 404
    agent = client.get("/api/v1/agents/echo", headers=org.headers).get_json()
    assert agent["current_version"] == "1.0.1", "nothing refused moved the agent"
    client.delete("/api/v1/agents/echo", headers=org.headers)
    archived = client.post(path, json={"version": "1.0.0"}, headers=org.headers)
    assert archived.status_code == 409 and archived.get_json()["hint"]


def test_a_chain_rolls_back_too(client, org, other_org):
    create_agent(client, org)
    chain = {"name": "pipe", "input_schema": TEXT_IN, "steps": [{"name": "one", "agent": "echo"}]}
    assert client.post("/api/v1/chains", json=chain, headers=org.headers).status_code == 201
    steps = [{"name": "first", "agent": "echo"}]
    patch(client, org, "/api/v1/chains/pipe", {"steps": steps, "changelog": "renamed the step"})
    path = "/api/v1/chains/pipe/rollback"
    response = client.post(path, json={"version": "1.0.0"}, headers=org.headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["current_version"] == "1.0.0"
    assert response.get_json()["steps"][0]["name"] == "one"
    submit = {"input": {"text": "hi"}}
    run = client.post("/api/v1/chains/pipe/executions", json=submit, headers=org.headers)
    assert run.get_json()["chain_version"] == "1.0.0"
    listed = client.get("/api/v1/chains/pipe/versions", headers=org.headers).get_json()
    assert [(v["version"], v["changelog"]) for v in listed] == [
        ("1.0.1", "renamed the step"),
        ("1.0.0", None),
    ]
    assert client.post(path, json={"version": "2.0.0"}, headers=org.headers).status_code == 404
    assert (
        client.post(path, json={"version": "1.0.0"}, headers=other_org.headers).status_code == 404
    )
    viewer = bearer(make_token(org, "viewer"))
    assert client.post(path, json={"version": "1.0.0"}, headers=viewer).status_code == 403


# ---------------------------------------------------------------------------------------------
# Diff


def diff(client, org, path, code=200):
    response = client.get(path, headers=org.headers)
    assert response.status_code == code, response.get_json()
    return response.get_json()


def test_a_diff_lists_rfc6902_changes_and_names_the_breaking_ones(client, org):
    create_agent(client, org, timeout_seconds=60, limits={"memory_mb": 512})
    patch(
        client,
        org,
        "/api/v1/agents/echo",
        {
            "input_schema": {
                "type": "object",
                "required": ["text", "lang"],
                "properties": {"text": {"type": "string"}, "lang": {"enum": ["en", "fr"]}},
            },
            "output_schema": {"type": "object"},
            "timeout_seconds": 30,
            "limits": {"memory_mb": 256},
            "capabilities": [],
        },
    )
    body = diff(client, org, "/api/v1/agents/echo/versions/1.0.1/diff?against=1.0.0")
    assert (body["from"], body["to"]) == ("1.0.0", "1.0.1")
    ops = {(op["op"], op["path"]) for op in body["changes"]}
    assert ("replace", "/timeout_seconds") in ops and ("replace", "/limits/memory_mb") in ops
    assert ("add", "/input_schema/properties/lang") in ops
    assert ("remove", "/output_schema/properties") in ops
    breaking = {(b["path"], b["reason"]) for b in body["breaking"]}
    assert ("/input_schema/required", "newly requires 'lang'") in breaking
    assert ("/output_schema/required", "'text' is no longer required") in breaking
    assert ("/output_schema/properties/text", "drops 'text'") in breaking
    assert ("/capabilities", "no longer offers 'v1'") in breaking
    paths = {path for path, _ in breaking}
    assert {"/timeout_seconds", "/limits/memory_mb"} <= paths
    # The other way round only widens: the input stops requiring `lang` (an open object still
    # accepts it), the output promises more, the limits and the timeout grow.
    back = diff(client, org, "/api/v1/agents/echo/versions/1.0.0/diff?against=1.0.1")
    assert (back["from"], back["to"]) == ("1.0.1", "1.0.0")
    assert back["breaking"] == []


def test_narrowed_types_values_and_closed_objects_are_breaking(client, org):
    create_agent(
        client,
        org,
        input_schema={
            "type": "object",
            "properties": {
                "n": {"type": "number"},
                "kind": {"enum": ["a", "b"]},
                "extra": {"type": "string"},
            },
        },
    )
    patch(
        client,
        org,
        "/api/v1/agents/echo",
        {
            "input_schema": {
                "type": "object",
                "properties": {"n": {"type": "integer"}, "kind": {"enum": ["a"]}},
                "additionalProperties": False,
            },
            "runtime": {
                "type": "script",
                "language": "python",
                "source": "def run(i, c):\n    return i\n",
            },
        },
    )
    body = diff(client, org, "/api/v1/agents/echo/versions/1.0.1/diff?against=1.0.0")
    paths = {b["path"] for b in body["breaking"]}
    assert paths >= {
        "/input_schema/properties/n/type",
        "/input_schema/properties/kind/enum",
        "/input_schema/additionalProperties",
        "/input_schema/properties/extra",
        "/runtime/type",
    }


def test_an_additive_change_is_not_breaking_and_against_defaults_to_the_current(client, org):
    create_agent(client, org)
    widened = {**TEXT_IN, "properties": {**TEXT_IN["properties"], "lang": {"type": "string"}}}
    patch(client, org, "/api/v1/agents/echo", {"input_schema": widened, "timeout_seconds": 600})
    body = diff(client, org, "/api/v1/agents/echo/versions/1.0.0/diff")
    assert (body["from"], body["to"]) == ("1.0.1", "1.0.0")
    forward = diff(client, org, "/api/v1/agents/echo/versions/1.0.1/diff?against=1.0.0")
    assert forward["breaking"] == [] and len(forward["changes"]) == 2
    same = diff(client, org, "/api/v1/agents/echo/versions/1.0.1/diff")
    assert same["changes"] == [] and same["breaking"] == []


def test_diff_refusals(client, org, other_org):
    create_agent(client, org)
    assert diff(client, org, "/api/v1/agents/echo/versions/2.0.0/diff", 404)["hint"]
    assert diff(client, org, "/api/v1/agents/echo/versions/1.0.0/diff?against=0.1.0", 404)
    assert diff(client, org, "/api/v1/agents/echo/versions/1.0.0/diff?against=", 422)
    other = client.get("/api/v1/agents/echo/versions/1.0.0/diff", headers=other_org.headers)
    assert other.status_code == 404
    viewer = bearer(make_token(org, "viewer"))
    seen = client.get("/api/v1/agents/echo/versions/1.0.0/diff", headers=viewer)
    assert seen.status_code == 200, "reading a diff is reading versions"


def test_a_diff_masks_literal_config_values_as_every_answer_does(client, org):
    create_agent(client, org, config={"api_key": "literal-one"})
    patch(client, org, "/api/v1/agents/echo", {"config": {"api_key": "literal-two"}})
    path = "/api/v1/agents/echo/versions/1.0.1/diff?against=1.0.0"
    admin = diff(client, org, path)
    assert {"op": "replace", "path": "/config/api_key", "value": "literal-two"} in admin["changes"]
    for role in ("operator", "viewer"):
        shown = client.get(path, headers=bearer(make_token(org, role)))
        assert shown.status_code == 200
        assert "literal-" not in shown.get_data(as_text=True), role


def test_a_chain_diff_names_a_narrowed_input(client, org, other_org):
    create_agent(client, org)
    chain = {"name": "pipe", "input_schema": TEXT_IN, "steps": [{"name": "one", "agent": "echo"}]}
    assert client.post("/api/v1/chains", json=chain, headers=org.headers).status_code == 201
    closed = {**TEXT_IN, "additionalProperties": False}
    patch(client, org, "/api/v1/chains/pipe", {"input_schema": closed})
    body = diff(client, org, "/api/v1/chains/pipe/versions/1.0.1/diff?against=1.0.0")
    assert body["changes"] == [
        {"op": "add", "path": "/input_schema/additionalProperties", "value": False}
    ]
    assert body["breaking"] == [
        {
            "path": "/input_schema/additionalProperties",
            "reason": "refuses properties it does not list",
        }
    ]
    other = client.get("/api/v1/chains/pipe/versions/1.0.1/diff", headers=other_org.headers)
    assert other.status_code == 404


# ---------------------------------------------------------------------------------------------
# Changelog


def test_a_changelog_is_kept_on_the_new_version(client, org):
    create_agent(client, org)
    patch(client, org, "/api/v1/agents/echo", {"config": {"v": 2}, "changelog": "v2 config"})
    one = client.get("/api/v1/agents/echo/versions/1.0.1", headers=org.headers).get_json()
    assert one["changelog"] == "v2 config"
    listed = client.get("/api/v1/agents/echo/versions", headers=org.headers).get_json()
    assert [v["changelog"] for v in listed] == ["v2 config", None]


@pytest.mark.parametrize(
    "body",
    [
        {"description": "no new version", "changelog": "nowhere to keep it"},
        {"config": {"v": 2}, "changelog": ""},
        {"config": {"v": 2}, "changelog": "x" * 4001},
        {"config": {"v": 2}, "changelog": 5},
        {"config": {"v": 2}, "force": "yes please"},
    ],
)
def test_bad_changelogs_and_force_are_422_by_pointer(client, org, body):
    create_agent(client, org)
    response = client.patch("/api/v1/agents/echo", json=body, headers=org.headers)
    assert response.status_code == 422, response.get_json()
    assert set(response.get_json()["errors"]) & {"/changelog", "/force"}
    assert versions(client, org) == ["1.0.0"]


# ---------------------------------------------------------------------------------------------
# The 409 on a PATCH that breaks what depends on the agent


def make_pipe(client, org, *, pinned=False):
    create_agent(client, org, name="maker")
    create_agent(client, org, name="reader")
    step = {"name": "b", "agent": "reader", **({"version": "1.0.0"} if pinned else {})}
    chain = {
        "name": "pipe",
        "input_schema": TEXT_IN,
        "steps": [{"name": "a", "agent": "maker"}, step],
    }
    assert client.post("/api/v1/chains", json=chain, headers=org.headers).status_code == 201


def test_a_patch_that_breaks_an_unpinned_chain_is_409_until_forced(client, org):
    make_pipe(client, org)
    needs_lang = {**TEXT_IN, "required": ["text", "lang"]}
    refused = patch(client, org, "/api/v1/agents/reader", {"input_schema": needs_lang}, 409)
    assert list(refused["errors"]) == ["chain:pipe"]
    assert "lang" in refused["errors"]["chain:pipe"][0]
    assert "force" in refused["hint"]
    assert versions(client, org, "reader") == ["1.0.0"], "the refused version is not kept"
    # The upstream agent breaks it too: its output no longer promises `text`.
    refused = patch(client, org, "/api/v1/agents/maker", {"output_schema": {"type": "object"}}, 409)
    assert list(refused["errors"]) == ["chain:pipe"]
    forced = patch(
        client,
        org,
        "/api/v1/agents/reader",
        {"input_schema": needs_lang, "force": True, "changelog": "lang is required"},
    )
    assert forced["current_version"] == "1.0.1"


def test_a_chain_that_pins_the_agent_does_not_hold_it_back(client, org):
    make_pipe(client, org, pinned=True)
    needs_lang = {**TEXT_IN, "required": ["text", "lang"]}
    assert (
        patch(client, org, "/api/v1/agents/reader", {"input_schema": needs_lang})["current_version"]
        == "1.0.1"
    )


def test_a_chain_broken_already_is_not_this_patchs_fault(client, org):
    make_pipe(client, org)
    create_agent(client, org, name="other")
    chain = {
        "name": "later",
        "input_schema": TEXT_IN,
        "steps": [{"name": "x", "agent": "reader"}, {"name": "y", "agent": "other"}],
    }
    assert client.post("/api/v1/chains", json=chain, headers=org.headers).status_code == 201
    client.delete("/api/v1/agents/other", headers=org.headers)
    # An additive change to reader: `later` fails its checks (other is archived), but did before.
    widened = {**TEXT_IN, "properties": {**TEXT_IN["properties"], "lang": {"type": "string"}}}
    assert patch(client, org, "/api/v1/agents/reader", {"input_schema": widened})


def succeeded(client, org, agent, payload) -> str:
    from app.db import db

    response = client.post(
        f"/api/v1/agents/{agent}/executions", json={"input": payload}, headers=org.headers
    )
    execution_id = response.get_json()["id"]
    with db.hot() as conn:
        conn.execute(
            text("UPDATE executions SET status = 'succeeded', finished_at = now() WHERE id = :id"),
            {"id": execution_id},
        )
    return execution_id


def test_a_patch_refusing_a_recently_accepted_input_is_409_until_forced(client, org):
    create_agent(client, org)
    accepted = succeeded(client, org, "echo", {"text": "hi"})
    short = {**TEXT_IN, "properties": {"text": {"type": "string", "maxLength": 1}}}
    refused = patch(client, org, "/api/v1/agents/echo", {"input_schema": short}, 409)
    assert list(refused["errors"]) == [f"execution:{accepted}"]
    assert refused["errors"][f"execution:{accepted}"][0].startswith("/input/text: ")
    assert "force" in refused["hint"]
    # A change that still accepts it goes through.
    longer = {**TEXT_IN, "properties": {"text": {"type": "string", "maxLength": 10}}}
    assert (
        patch(client, org, "/api/v1/agents/echo", {"input_schema": longer})["current_version"]
        == "1.0.1"
    )
    forced = patch(client, org, "/api/v1/agents/echo", {"input_schema": short, "force": True})
    assert forced["current_version"] == "1.0.2"


def test_only_succeeded_executions_hold_an_input_schema_back(client, org):
    create_agent(client, org)
    client.post(
        "/api/v1/agents/echo/executions", json={"input": {"text": "queued"}}, headers=org.headers
    )
    short = {**TEXT_IN, "properties": {"text": {"type": "string", "maxLength": 1}}}
    assert (
        patch(client, org, "/api/v1/agents/echo", {"input_schema": short})["current_version"]
        == "1.0.1"
    )
