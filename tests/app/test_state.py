"""Agent state over the API (versions, ETag and If-Match, limits, roles, tenancy, audit) and as
`ctx.state` sees it (workers.agent_state.AgentState), with concurrent compare-and-set writers on
committed rows."""

from __future__ import annotations

import json
import threading
import uuid

import pytest
from sqlalchemy import text

from app.db import db
from app.errors import StateConflict, ValidationFailed
from app.state import services
from tests.conftest import bearer, make_token
from workers.agent_state import AgentState

AGENT = {"name": "keeper", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}}
STATE = "/api/v1/agents/keeper/state"


@pytest.fixture
def agent(client, org) -> dict:
    response = client.post("/api/v1/agents", json=AGENT, headers=org.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def put(client, org, key, value, headers=None, agent="keeper"):
    return client.put(
        f"/api/v1/agents/{agent}/state/{key}",
        json={"value": value},
        headers={**org.headers, **(headers or {})},
    )


def error(response, code: int) -> dict:
    body = response.get_json()
    assert response.status_code == code, body
    assert body["code"] == code and body["message"] and body["hint"], body
    return body


# ---------------------------------------------------------------------------------------------
# REST


def test_put_get_list_delete(client, org, agent):
    first = put(client, org, "cursor", {"page": 1})
    assert first.status_code == 200, first.get_json()
    assert first.headers["ETag"] == '"1"'
    body = first.get_json()
    assert set(body) == {"key", "value", "version", "updated_at"}
    assert (body["key"], body["value"], body["version"]) == ("cursor", {"page": 1}, 1)

    second = put(client, org, "cursor", {"page": 2})
    assert second.get_json()["version"] == 2 and second.headers["ETag"] == '"2"'
    got = client.get(f"{STATE}/cursor", headers=org.headers)
    assert got.status_code == 200 and got.headers["ETag"] == '"2"'
    assert got.get_json()["value"] == {"page": 2} and got.get_json()["version"] == 2
    # By id as well as by name.
    by_id = client.get(f"/api/v1/agents/{agent['id']}/state/cursor", headers=org.headers)
    assert by_id.get_json() == got.get_json()

    put(client, org, "a.first", 1)
    listed = client.get(STATE, headers=org.headers)
    assert listed.status_code == 200
    assert [(item["key"], item["version"]) for item in listed.get_json()] == [
        ("a.first", 1),
        ("cursor", 2),
    ]
    assert set(listed.get_json()[0]) == {"key", "version", "updated_at"}
    assert json.loads(listed.headers["X-Pagination"])["total"] == 2
    paged = client.get(f"{STATE}?page=2&page_size=1", headers=org.headers).get_json()
    assert [item["key"] for item in paged] == ["cursor"]

    assert client.delete(f"{STATE}/cursor", headers=org.headers).status_code == 204
    error(client.get(f"{STATE}/cursor", headers=org.headers), 404)
    error(client.delete(f"{STATE}/cursor", headers=org.headers), 404)
    # Set again after a delete: a new entry, at version 1.
    assert put(client, org, "cursor", 0).get_json()["version"] == 1


@pytest.mark.parametrize(
    "value", [None, [1, "two", None], "text", 3.5, -7, True, {"nested": {"deep": [{}]}}, ""]
)
def test_a_value_is_any_json(client, org, agent, value):
    assert put(client, org, "any", value).get_json()["value"] == value
    assert client.get(f"{STATE}/any", headers=org.headers).get_json()["value"] == value


def test_if_match_writes_only_at_that_version(client, org, agent):
    put(client, org, "counter", 1)
    put(client, org, "counter", 2)
    stale = put(client, org, "counter", 99, headers={"If-Match": '"1"'})
    body = error(stale, 412)
    assert body["status"] == "Precondition Failed"
    assert "version 2" in body["message"] and "If-Match" in body["errors"]
    assert "ETag" in body["hint"]
    assert client.get(f"{STATE}/counter", headers=org.headers).get_json()["value"] == 2

    fresh = put(client, org, "counter", 3, headers={"If-Match": '"2"'})
    assert fresh.status_code == 200 and fresh.get_json()["version"] == 3
    # `*`: only when the key is set.
    assert put(client, org, "counter", 4, headers={"If-Match": "*"}).get_json()["version"] == 4
    error(put(client, org, "unset", 1, headers={"If-Match": "*"}), 412)
    # An entity tag that is no quoted version matches nothing.
    for header in ("4", 'W/"4"', '"four"', '"4", "5"'):
        refused = put(client, org, "counter", 5, headers={"If-Match": header})
        assert "If-Match" in error(refused, 412)["errors"], header


def test_if_match_zero_means_the_key_must_not_exist(client, org, agent):
    created = put(client, org, "lock", {"owner": "a"}, headers={"If-Match": '"0"'})
    assert created.status_code == 200 and created.get_json()["version"] == 1
    taken = put(client, org, "lock", {"owner": "b"}, headers={"If-Match": '"0"'})
    assert "version 1" in error(taken, 412)["message"]
    assert client.get(f"{STATE}/lock", headers=org.headers).get_json()["value"] == {"owner": "a"}


def test_delete_honours_if_match(client, org, agent):
    put(client, org, "job", "x")
    put(client, org, "job", "y")
    error(client.delete(f"{STATE}/job", headers={**org.headers, "If-Match": '"1"'}), 412)
    assert client.get(f"{STATE}/job", headers=org.headers).status_code == 200
    gone = client.delete(f"{STATE}/job", headers={**org.headers, "If-Match": '"2"'})
    assert gone.status_code == 204
    # A stale version of a key that is gone: the condition fails (412), not a 404.
    error(client.delete(f"{STATE}/job", headers={**org.headers, "If-Match": '"2"'}), 412)


@pytest.mark.parametrize("key", ["bad key", "x" * 201, "é", "semi;colon"])
def test_a_key_off_the_pattern_is_422(client, org, agent, key):
    body = error(put(client, org, key, 1), 422)
    assert "key" in body["errors"] and "^[A-Za-z0-9_.:-]{1,200}$" in body["message"]
    assert "key" in error(client.get(f"{STATE}/{key}", headers=org.headers), 422)["errors"]


def test_the_longest_key_and_every_allowed_character(client, org, agent):
    for key in ("k" * 200, "A-z_0.9:x"):
        assert put(client, org, key, 1).status_code == 200, key
        assert client.get(f"{STATE}/{key}", headers=org.headers).get_json()["key"] == key


def test_a_value_over_256_kb_is_422_and_at_the_limit_is_stored(client, org, agent):
    # As JSON: two quotes around the text.
    at_limit = "x" * (256 * 1024 - 2)
    assert put(client, org, "blob", at_limit).status_code == 200
    body = error(put(client, org, "blob", at_limit + "x"), 422)
    assert body["errors"] == {"/value": ["at most 262144 bytes as JSON, not 262145"]}
    assert client.get(f"{STATE}/blob", headers=org.headers).get_json()["version"] == 1


def test_a_body_without_a_value_or_with_other_fields_is_422(client, org, agent):
    missing = client.put(f"{STATE}/k", json={}, headers=org.headers)
    assert "/value" in error(missing, 422)["errors"]
    extra = client.put(f"{STATE}/k", json={"value": 1, "version": 3}, headers=org.headers)
    assert "/version" in error(extra, 422)["errors"]


def test_unknown_agents_and_other_organizations_agents_are_404(client, org, other_org, agent):
    put(client, org, "mine", "secret plan")
    for path in ("/api/v1/agents/nobody/state", "/api/v1/agents/nobody/state/mine"):
        error(client.get(path, headers=org.headers), 404)
    for ref in ("keeper", agent["id"]):
        base = f"/api/v1/agents/{ref}/state"
        error(client.get(base, headers=other_org.headers), 404)
        error(client.get(f"{base}/mine", headers=other_org.headers), 404)
        error(put(client, other_org, "mine", "theirs", agent=ref), 404)
        error(client.delete(f"{base}/mine", headers=other_org.headers), 404)
    assert client.get(f"{STATE}/mine", headers=org.headers).get_json()["version"] == 1


def test_readers_read_and_submitters_write(client, org, agent):
    put(client, org, "shared", 1)
    viewer = bearer(make_token(org, "viewer"))
    assert client.get(f"{STATE}/shared", headers=viewer).get_json()["value"] == 1
    assert client.get(STATE, headers=viewer).status_code == 200
    refused = client.put(f"{STATE}/shared", json={"value": 2}, headers=viewer)
    assert "executions:submit" in error(refused, 403)["message"]
    error(client.delete(f"{STATE}/shared", headers=viewer), 403)
    operator = bearer(make_token(org, "operator"))
    written = client.put(f"{STATE}/shared", json={"value": 3}, headers=operator)
    assert written.get_json()["version"] == 2
    assert client.delete(f"{STATE}/shared", headers=operator).status_code == 204


def _events(client, org, action) -> list[dict]:
    response = client.get("/api/v1/audit", query_string={"action": action}, headers=org.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_writes_over_the_api_are_audited_with_small_values_only(client, org, agent):
    put(client, org, "small", {"a": 1})
    put(client, org, "big", "x" * 5000)
    client.delete(f"{STATE}/small", headers=org.headers)
    big, small = _events(client, org, "state.put")
    assert small["object"] == {"type": "agent_state", "id": agent["id"], "name": "keeper/small"}
    assert small["changes"] == [
        {"op": "add", "path": "/value", "value": {"a": 1}},
        {"op": "add", "path": "/version", "value": 1},
    ]
    assert big["object"]["name"] == "keeper/big"
    assert big["changes"][0] == {"op": "add", "path": "/size", "value": 5002}
    assert "xxxx" not in json.dumps(big)
    [deleted] = _events(client, org, "state.delete")
    assert deleted["object"]["name"] == "keeper/small"
    assert {"op": "test", "path": "/version", "value": 1} in deleted["changes"]
    # A refused write writes no event.
    put(client, org, "big", 1, headers={"If-Match": '"7"'})
    assert len(_events(client, org, "state.put")) == 2


# ---------------------------------------------------------------------------------------------
# ctx.state (workers.agent_state.AgentState) on the test's connection


@pytest.fixture
def state(connection, org, agent) -> AgentState:
    return AgentState(db.hot, org.id, agent["id"])


def test_ctx_state_gets_sets_and_deletes(state, client, org):
    assert state.get("seen") is None and state.get("seen", default=[]) == []
    assert state.entry("seen") is None
    assert state.set("seen", ["a"]) == 1
    assert state.set("seen", ("a", "b")) == 2
    # Through JSON: a tuple comes back a list, keys of objects as strings.
    assert state.get("seen") == ["a", "b"]
    assert state.entry("seen") == {"value": ["a", "b"], "version": 2}
    state.set("map", {1: "one"})
    assert state.get("map") == {"1": "one"}
    # The API sees what the agent wrote, and the other way round.
    assert client.get(f"{STATE}/seen", headers=org.headers).get_json()["version"] == 2
    put(client, org, "seen", "from the API")
    assert state.entry("seen") == {"value": "from the API", "version": 3}
    assert state.delete("seen") is True and state.delete("seen") is False
    assert state.get("seen", 0) == 0
    # An agent's own writes are its work, not audit events.
    [only] = _events(client, org, "state.put")
    assert only["actor"]["token_name"] == "admin"


def test_ctx_state_compare_and_set(state):
    assert state.set("lock", "me", expected_version=0) == 1
    with pytest.raises(StateConflict) as taken:
        state.set("lock", "you", expected_version=0)
    assert taken.value.current_version == 1 and taken.value.expected_version == 0
    assert taken.value.status_code == 409 and taken.value.hint
    with pytest.raises(StateConflict) as stale:
        state.set("lock", "you", expected_version=5)
    assert stale.value.current_version == 1 and "version 1" in str(stale.value)
    assert state.set("lock", "you", expected_version=1) == 2
    with pytest.raises(StateConflict) as missing:
        state.set("nothing", 1, expected_version=1)
    assert missing.value.current_version == 0
    assert state.get("lock") == "you"


@pytest.mark.parametrize(
    ("key", "value", "pointer"),
    [
        ("bad key", 1, "key"),
        ("", 1, "key"),
        (42, 1, "key"),
        ("k", {1, 2}, "/value"),
        ("k", object(), "/value"),
        ("k", float("nan"), "/value"),
        ("k", {"a": [float("inf")]}, "/value/a/0"),
        ("k", {"text": "nul\x00"}, "/value/text"),
        ("k", "lone \ud800", "/value"),
        ("k", "x" * (256 * 1024), "/value"),
    ],
)
def test_ctx_state_refuses_what_it_cannot_store(state, key, value, pointer):
    with pytest.raises(ValidationFailed) as refused:
        state.set(key, value)
    assert pointer in refused.value.errors and refused.value.hint
    assert state.get("k") is None


def test_ctx_state_refuses_an_expected_version_that_is_no_version(state):
    for expected in (-1, "1", 1.0, True):
        with pytest.raises(ValidationFailed) as refused:
            state.set("k", 1, expected_version=expected)
        assert "expected_version" in refused.value.errors


def test_each_organization_keeps_its_own_state_of_an_agent(connection, org, other_org, agent):
    """A public agent run through the catalog writes the caller's state, not its owner's."""
    owners = AgentState(db.hot, org.id, agent["id"])
    callers = AgentState(db.hot, other_org.id, agent["id"])
    owners.set("k", "owner's")
    assert callers.get("k") is None
    assert callers.set("k", "caller's") == 1
    assert owners.entry("k") == {"value": "owner's", "version": 1}


# ---------------------------------------------------------------------------------------------
# Concurrent writers, on committed rows


@pytest.fixture
def committed_agent(app, live_org) -> uuid.UUID:
    response = app.test_client().post("/api/v1/agents", json=AGENT, headers=live_org.headers)
    assert response.status_code == 201, response.get_json()
    return uuid.UUID(response.get_json()["id"])


def _in_threads(count: int, work) -> list:
    barrier = threading.Barrier(count)
    results: list = [None] * count
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = work(index)
        except BaseException as exc:  # reported below, with the thread's traceback
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if failures:
        raise failures[0]
    return results


def test_concurrent_read_modify_write_loses_no_increment(live_org, committed_agent):
    writers, increments = 8, 15

    def increment(_index: int) -> int:
        state = AgentState(db.hot, live_org.id, committed_agent)
        conflicts = 0
        for _ in range(increments):
            while True:
                found = state.entry("counter")
                current, version = (0, 0) if found is None else (found["value"], found["version"])
                try:
                    state.set("counter", current + 1, expected_version=version)
                    break
                except StateConflict:
                    conflicts += 1
        return conflicts

    conflicts = _in_threads(writers, increment)
    final = AgentState(db.hot, live_org.id, committed_agent).entry("counter")
    assert final == {"value": writers * increments, "version": writers * increments}
    assert sum(conflicts) > 0  # they did race


def test_concurrent_creates_with_version_zero_have_one_winner(live_org, committed_agent):
    def create(index: int) -> bool:
        try:
            AgentState(db.hot, live_org.id, committed_agent).set(
                "leader", index, expected_version=0
            )
            return True
        except StateConflict as conflict:
            assert conflict.current_version == 1
            return False

    won = _in_threads(8, create)
    assert won.count(True) == 1
    leader = AgentState(db.hot, live_org.id, committed_agent).entry("leader")
    assert leader == {"value": won.index(True), "version": 1}


def test_concurrent_if_match_writers_over_the_api_lose_no_increment(app, live_org, committed_agent):
    writers, increments = 4, 5
    path = f"/api/v1/agents/{committed_agent}/state/hits"

    def increment(_index: int) -> int:
        client = app.test_client()
        refused = 0
        for _ in range(increments):
            while True:
                got = client.get(path, headers=live_org.headers)
                if got.status_code == 404:
                    value, etag = 0, '"0"'
                else:
                    value, etag = got.get_json()["value"], got.headers["ETag"]
                response = client.put(
                    path, json={"value": value + 1}, headers={**live_org.headers, "If-Match": etag}
                )
                if response.status_code == 200:
                    break
                assert response.status_code == 412, response.get_json()
                refused += 1
        return refused

    _in_threads(writers, increment)
    final = app.test_client().get(path, headers=live_org.headers)
    assert final.get_json()["value"] == writers * increments
    assert final.headers["ETag"] == f'"{writers * increments}"'
    with db.hot() as conn:
        events = conn.execute(
            text("SELECT count(*) FROM audit_events WHERE org_id = :org AND action = 'state.put'"),
            {"org": live_org.id},
        ).scalar_one()
    assert events == writers * increments


def test_services_take_a_session_as_well_as_a_connection(connection, org, agent):
    with db.session() as session:
        written = services.put(session, org.id, agent["id"], "k", [1])
        assert services.entry(session, org.id, agent["id"], "k")["value"] == [1]
        items, total = services.keys(session, org.id, agent["id"])
        assert total == 1 and items[0]["key"] == "k" and items[0]["version"] == written["version"]
        assert services.delete(session, org.id, agent["id"], "k") is True
        session.commit()
