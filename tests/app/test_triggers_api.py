"""Webhook triggers: signatures, timestamps, replays and `$.event` references (no worker)."""

import hashlib
import hmac
import json
import time

from sqlalchemy import text

from tests.app.test_executions_api import make_agent


def make_trigger(client, org, **overrides):
    body = {
        "name": "on-ticket",
        "target": {"agent": "echo"},
        "input": {"text": "$.event.ticket.title"},
    }
    body.update(overrides)
    response = client.post("/api/v1/triggers", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def signed(secret, body: bytes, timestamp=None):
    return {
        "X-Runyard-Signature": "sha256="
        + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
        "X-Runyard-Timestamp": str(int(time.time()) if timestamp is None else timestamp),
        "Content-Type": "application/json",
    }


def deliver(client, trigger, event, secret=None, **kwargs):
    raw = json.dumps(event).encode()
    return client.post(
        trigger["url"], data=raw, headers=signed(secret or trigger["secret"], raw, **kwargs)
    )


def test_create_shows_the_secret_once(client, org):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    assert trigger["url"] == f"/hooks/{trigger['id']}" and trigger["secret"].startswith("whsec_")
    read = client.get(f"/api/v1/triggers/{trigger['id']}", headers=org.headers).get_json()
    assert "secret" not in read and read["url"] == trigger["url"]
    listed = client.get("/api/v1/triggers", headers=org.headers).get_json()
    assert [item["id"] for item in listed] == [trigger["id"]] and "secret" not in listed[0]


def test_a_signed_delivery_starts_an_execution_with_the_event(client, org, connection):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    response = deliver(client, trigger, {"ticket": {"title": "printer on fire", "id": 7}})
    body = response.get_json()
    assert response.status_code == 202, body
    assert body["trigger_id"] == trigger["id"]
    execution = client.get(f"/api/v1/executions/{body['execution_id']}", headers=org.headers)
    assert execution.get_json()["input"] == {"text": "printer on fire"}
    dispatched = connection.execute(
        text("SELECT dispatched_at FROM executions WHERE id = :id"), {"id": body["execution_id"]}
    ).scalar()
    assert dispatched is not None


def test_bad_stale_missing_and_replayed_requests_are_401_and_start_nothing(client, org, connection):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    event = {"ticket": {"title": "hello"}}
    raw = json.dumps(event).encode()
    refused = [
        deliver(client, trigger, event, secret="whsec_wrong"),
        deliver(client, trigger, event, timestamp=int(time.time()) - 301),
        deliver(client, trigger, event, timestamp=int(time.time()) + 301),
        deliver(client, trigger, event, timestamp="yesterday"),
        client.post(trigger["url"], data=raw, headers={"Content-Type": "application/json"}),
        # The signature of another body.
        client.post(trigger["url"], data=raw + b" ", headers=signed(trigger["secret"], raw)),
    ]
    for response in refused:
        assert response.status_code == 401, response.get_json()
        assert response.get_json()["hint"]
    first = deliver(client, trigger, event)
    assert first.status_code == 202
    replay = deliver(client, trigger, event)
    assert replay.status_code == 401 and "replay" in replay.get_json()["message"]
    # Re-sent later with a fresh timestamp: the signature is the same, still a replay.
    later = deliver(client, trigger, event, timestamp=int(time.time()) + 60)
    assert later.status_code == 401
    count = connection.execute(
        text("SELECT count(*) FROM executions WHERE org_id = :org"), {"org": org.id}
    ).scalar()
    assert count == 1


def test_references_and_input_are_checked(client, org, connection):
    make_agent(client, org)
    trigger = make_trigger(client, org, input={"text": "$.event.items[1].name", "count": 2})
    ok = deliver(client, trigger, {"items": [{"name": "a"}, {"name": "b"}]})
    assert ok.status_code == 202, ok.get_json()
    execution = client.get(
        f"/api/v1/executions/{ok.get_json()['execution_id']}", headers=org.headers
    )
    assert execution.get_json()["input"] == {"text": "b", "count": 2}
    missing = deliver(client, trigger, {"items": []})
    assert missing.status_code == 422 and "/input/text" in missing.get_json()["errors"]
    wrong_type = deliver(client, trigger, {"items": [{}, {"name": 5}]})
    assert wrong_type.status_code == 422 and "/input/text" in wrong_type.get_json()["errors"]
    raw = b"not json"
    not_json = client.post(trigger["url"], data=raw, headers=signed(trigger["secret"], raw))
    assert not_json.status_code == 400
    # A refused delivery is not remembered: once fixed, the sender's retry is accepted.
    retry = deliver(client, trigger, {"items": [{"name": "a"}, {"name": "c"}], "n": 1})
    assert retry.status_code == 202


def test_creation_checks_target_references_and_literal_input(client, org):
    make_agent(client, org)
    cases = [
        ({"target": {"agent": "nope"}}, "/target/agent"),
        ({"target": {"chain": "nope"}}, "/target/chain"),
        ({"input": {"text": "$.input.text"}}, "/input/text"),
        ({"input": {"text": "$.event..x"}}, "/input/text"),
        ({"input": {"count": 3}}, "/input"),
        ({"secret": "mine"}, "/secret"),
    ]
    for overrides, pointer in cases:
        body = {"name": "t", "target": {"agent": "echo"}, "input": {"text": "x"}, **overrides}
        response = client.post("/api/v1/triggers", json=body, headers=org.headers)
        assert response.status_code == 422, (overrides, response.get_json())
        assert pointer in response.get_json()["errors"], (overrides, response.get_json())


def test_unknown_or_deleted_trigger_is_404(client, org):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    assert client.post("/hooks/not-a-uuid", data=b"{}").status_code == 404
    assert (
        client.delete(f"/api/v1/triggers/{trigger['id']}", headers=org.headers).status_code == 204
    )
    assert deliver(client, trigger, {"ticket": {"title": "x"}}).status_code == 404


def test_a_signature_outside_ascii_is_401_not_500(client, org):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    raw = json.dumps({"ticket": {"title": "x"}}).encode()
    headers = {**signed(trigger["secret"], raw), "X-Runyard-Signature": "sha256=\u00e9\u00e9"}
    assert client.post(trigger["url"], data=raw, headers=headers).status_code == 401


def test_an_archived_agent_is_not_started_by_its_trigger(client, org):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    client.delete("/api/v1/agents/echo", headers=org.headers)
    response = deliver(client, trigger, {"ticket": {"title": "late"}})
    assert response.status_code == 409 and "archived" in response.get_json()["message"]


def test_a_chain_target_is_checked_and_stored(client, org, connection):
    from tests.app.test_schedules_api import make_chain

    make_chain(client, org)
    body = {"name": "t", "target": {"chain": "pair"}, "input": {"value": "x"}}
    refused = client.post("/api/v1/triggers", json=body, headers=org.headers)
    assert refused.status_code == 422 and "/input/value" in refused.get_json()["errors"]
    body["target"]["version"] = "2.0.0"
    body["input"] = {"value": "$.event.n"}
    refused = client.post("/api/v1/triggers", json=body, headers=org.headers)
    assert refused.status_code == 422 and "/target/version" in refused.get_json()["errors"]
    body["target"]["version"] = "1.0.0"
    created = client.post("/api/v1/triggers", json=body, headers=org.headers)
    assert created.status_code == 201, created.get_json()
    trigger = created.get_json()
    row = connection.execute(
        text("SELECT agent_id, chain_id FROM triggers WHERE id = :id"), {"id": trigger["id"]}
    ).one()
    assert row.agent_id is None and row.chain_id is not None
    delivered = deliver(client, trigger, {"n": 4})
    assert delivered.status_code == 202, delivered.get_json()
    run = connection.execute(
        text("SELECT input FROM chain_executions WHERE id = :id"),
        {"id": delivered.get_json()["chain_execution_id"]},
    ).scalar_one()
    assert run == {"value": 4}
