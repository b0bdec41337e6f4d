"""Webhook deliveries signed with `Runyard-Signature: t=..,v1=..` over "<t>.<body>" (the
notifications' scheme), the older header still accepted, and the trigger's secret sealed at
rest (no worker)."""

import hashlib
import hmac
import json
import time

from sqlalchemy import text

from tests.app.test_executions_api import make_agent
from tests.app.test_triggers_api import deliver, make_trigger


def signed_v1(secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Runyard-Signature": f"t={stamp},v1={digest}", "Content-Type": "application/json"}


def post(client, trigger, event, headers):
    return client.post(trigger["url"], data=json.dumps(event).encode(), headers=headers)


def started(connection, trigger) -> int:
    return connection.execute(
        text("SELECT count(*) FROM trigger_deliveries WHERE trigger_id = :id"),
        {"id": trigger["id"]},
    ).scalar_one()


def test_the_timestamped_scheme_starts_an_execution(client, org):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    event = {"ticket": {"title": "signed with t", "id": 1}}
    raw = json.dumps(event).encode()
    response = post(client, trigger, event, signed_v1(trigger["secret"], raw))
    assert response.status_code == 202, response.get_json()
    execution = client.get(
        f"/api/v1/executions/{response.get_json()['execution_id']}", headers=org.headers
    ).get_json()
    assert execution["input"] == {"text": "signed with t"}


def test_an_old_timestamp_is_refused_and_cannot_be_refreshed(client, org, connection):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    event = {"ticket": {"title": "captured", "id": 2}}
    raw = json.dumps(event).encode()
    captured = signed_v1(trigger["secret"], raw, timestamp=int(time.time()) - 301)
    response = post(client, trigger, event, captured)
    assert response.status_code == 401 and "5 minutes" in response.get_json()["message"]
    # A fresh timestamp under the captured signature: the signature covers t, so it is bad.
    digest = captured["Runyard-Signature"].split(",")[1]
    moved = {**captured, "Runyard-Signature": f"t={int(time.time())},{digest}"}
    response = post(client, trigger, event, moved)
    assert response.status_code == 401 and response.get_json()["message"] == "bad signature"
    assert started(connection, trigger) == 0


def test_a_replay_within_the_window_is_refused(client, org, connection):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    event = {"ticket": {"title": "twice", "id": 3}}
    headers = signed_v1(trigger["secret"], json.dumps(event).encode())
    assert post(client, trigger, event, headers).status_code == 202
    again = post(client, trigger, event, headers)
    assert again.status_code == 401 and "replay" in again.get_json()["message"]
    assert started(connection, trigger) == 1


def test_malformed_or_wrong_signatures_are_401_with_a_hint(client, org):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    event = {"ticket": {"title": "bad", "id": 4}}
    raw = json.dumps(event).encode()
    for header in (
        "v1=abc",
        "t=now,v1=abc",
        f"t={int(time.time())}",
        f"t={10**12},v1=abc",
        signed_v1("whsec_not-the-secret", raw)["Runyard-Signature"],
    ):
        response = post(client, trigger, event, {"Runyard-Signature": header})
        body = response.get_json()
        assert response.status_code == 401, (header, body)
        assert "Runyard-Signature" in body["hint"]


def test_one_matching_v1_of_several_is_enough(client, org):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    event = {"ticket": {"title": "rolling", "id": 5}}
    raw = json.dumps(event).encode()
    good = signed_v1(trigger["secret"], raw)["Runyard-Signature"]
    header = good.replace(",v1=", ",v1=" + "0" * 64 + ",v1=")
    assert post(client, trigger, event, {"Runyard-Signature": header}).status_code == 202


def test_the_older_header_still_works(client, org):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    response = deliver(client, trigger, {"ticket": {"title": "old style", "id": 6}})
    assert response.status_code == 202, response.get_json()


def test_the_trigger_secret_is_sealed_at_rest(client, org, connection):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    stored = connection.execute(
        text("SELECT secret FROM triggers WHERE id = :id"), {"id": trigger["id"]}
    ).scalar_one()
    assert stored.startswith("ry1.") and trigger["secret"] not in stored
    # Moved onto another trigger, it does not open there: that trigger's deliveries fail.
    other = make_trigger(client, org, name="other")
    connection.execute(
        text("UPDATE triggers SET secret = :secret WHERE id = :id"),
        {"secret": stored, "id": other["id"]},
    )
    event = {"ticket": {"title": "moved", "id": 7}}
    response = post(client, other, event, signed_v1(trigger["secret"], json.dumps(event).encode()))
    assert response.status_code == 503 and response.get_json()["hint"]


def test_a_clear_secret_left_by_the_migration_still_verifies(client, org, connection):
    make_agent(client, org)
    trigger = make_trigger(client, org)
    connection.execute(
        text("UPDATE triggers SET secret = :secret WHERE id = :id"),
        {"secret": trigger["secret"], "id": trigger["id"]},
    )
    event = {"ticket": {"title": "clear", "id": 8}}
    raw = json.dumps(event).encode()
    assert post(client, trigger, event, signed_v1(trigger["secret"], raw)).status_code == 202
