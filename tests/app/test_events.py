"""Events: POST /api/v1/events (dedupe, checks, roles, tenancy), event triggers (filters,
`$.event` references, errors recorded per trigger), housekeeping, and real workers running
what an event started."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from sqlalchemy import text

from tests.app.test_executions_api import make_agent
from tests.app.test_schedules_api import make_chain
from tests.conftest import bearer, make_token, wait_for

EVENTS = "/api/v1/events"


def send(client, org, name="order.paid", data=None, **extra):
    body = {"name": name, **({"data": data} if data is not None else {}), **extra}
    return client.post(EVENTS, json=body, headers=org.headers)


def sent(client, org, name="order.paid", data=None, **extra) -> dict:
    response = send(client, org, name, data, **extra)
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def event_trigger(client, org, name="on-paid", event="order.paid", **overrides) -> dict:
    body = {
        "name": name,
        "target": {"agent": "echo"},
        "input": {"text": "$.event.data.order.id"},
        "on_event": {"name": event},
        **overrides,
    }
    response = client.post("/api/v1/triggers", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def audit_actions(connection, org) -> list[str]:
    return list(
        connection.execute(
            text("SELECT action FROM audit_events WHERE org_id = :org ORDER BY id"),
            {"org": org.id},
        ).scalars()
    )


# ---------------------------------------------------------------------------------------------
# Sending, listing, reading


def test_an_event_is_accepted_listed_and_read(client, org, connection):
    body = sent(client, org, data={"order": {"id": "A-1"}}, id="evt-1")
    assert set(body) == {
        "id",
        "event_id",
        "name",
        "received_at",
        "resumed",
        "started",
        "duplicate",
    }
    assert body["event_id"] == "evt-1" and body["name"] == "order.paid"
    assert body["resumed"] == [] and body["started"] == [] and body["duplicate"] is False
    uuid.UUID(body["id"])
    listed = client.get(EVENTS, headers=org.headers)
    assert listed.status_code == 200 and "X-Pagination" in listed.headers
    [item] = listed.get_json()
    assert item["id"] == body["id"] and item["data"] == {"order": {"id": "A-1"}}
    assert item["created_by"]["token_name"] == "admin"
    for ref in (body["id"], "evt-1"):
        read = client.get(f"{EVENTS}/{ref}", headers=org.headers)
        assert read.status_code == 200 and read.get_json() == item, ref
    assert audit_actions(connection, org)[-1] == "event.send"


def test_without_an_id_each_event_is_new_and_data_defaults_to_an_object(client, org):
    first, second = sent(client, org), sent(client, org)
    assert first["id"] != second["id"] and first["event_id"] == first["id"]
    assert client.get(f"{EVENTS}/{first['id']}", headers=org.headers).get_json()["data"] == {}


def test_the_list_is_newest_first_paginated_and_filtered(client, org, connection):
    ids = [sent(client, org, name="a.b" if n % 2 else "c.d", data={"n": n})["id"] for n in range(5)]
    # Spread them over time, oldest first.
    for age, event_id in enumerate(reversed(ids)):
        connection.execute(
            text(
                "UPDATE events SET received_at = now() - make_interval(mins => :m) WHERE id = :id"
            ),
            {"m": age * 10, "id": event_id},
        )
    listed = client.get(EVENTS, headers=org.headers).get_json()
    assert [item["id"] for item in listed] == list(reversed(ids))
    paged = client.get(EVENTS, query_string={"page": 2, "page_size": 2}, headers=org.headers)
    assert [item["id"] for item in paged.get_json()] == list(reversed(ids))[2:4]
    assert json.loads(paged.headers["X-Pagination"])["total"] == 5
    named = client.get(EVENTS, query_string={"name": "a.b"}, headers=org.headers).get_json()
    assert [item["data"]["n"] for item in named] == [3, 1]
    now = dt.datetime.now(dt.UTC)
    window = {
        "since": (now - dt.timedelta(minutes=25)).isoformat(),
        "until": (now - dt.timedelta(minutes=5)).isoformat(),
    }
    recent = client.get(EVENTS, query_string=window, headers=org.headers).get_json()
    assert [item["data"]["n"] for item in recent] == [3, 2]
    refused = client.get(EVENTS, query_string={"name": "no spaces"}, headers=org.headers)
    assert refused.status_code == 422 and "name" in refused.get_json()["errors"]


def test_an_unknown_event_is_404(client, org):
    for ref in (str(uuid.uuid4()), "never-sent"):
        response = client.get(f"{EVENTS}/{ref}", headers=org.headers)
        assert response.status_code == 404 and response.get_json()["hint"]


# ---------------------------------------------------------------------------------------------
# Dedupe


def test_the_same_id_twice_is_one_event(client, org, connection):
    make_agent(client, org)
    event_trigger(client, org)
    first = sent(client, org, data={"order": {"id": "A-1"}}, id="order-1-paid")
    assert len(first["started"]) == 1 and first["duplicate"] is False
    events_before = len(audit_actions(connection, org))
    again = sent(client, org, data={"order": {"id": "other"}}, id="order-1-paid")
    assert again["duplicate"] is True and again["id"] == first["id"]
    assert again["received_at"] == first["received_at"]
    assert again["resumed"] == [] and again["started"] == []
    count = connection.execute(
        text("SELECT count(*) FROM events WHERE org_id = :org"), {"org": org.id}
    ).scalar()
    executions = connection.execute(
        text("SELECT count(*) FROM executions WHERE org_id = :org"), {"org": org.id}
    ).scalar()
    assert count == 1 and executions == 1
    # A duplicate changes nothing: no second audit event.
    assert len(audit_actions(connection, org)) == events_before


def test_the_same_id_is_accepted_again_after_24_hours(client, org, connection):
    first = sent(client, org, id="daily-report")
    connection.execute(
        text("UPDATE events SET received_at = now() - interval '25 hours' WHERE id = :id"),
        {"id": first["id"]},
    )
    again = sent(client, org, id="daily-report")
    assert again["duplicate"] is False and again["id"] != first["id"]
    keys = dict(
        connection.execute(
            text("SELECT id::text, dedupe_key FROM events WHERE org_id = :org"), {"org": org.id}
        ).all()
    )
    assert keys == {first["id"]: None, again["id"]: "daily-report"}
    # By the sender's id: the newest event with it.
    assert client.get(f"{EVENTS}/daily-report", headers=org.headers).get_json()["id"] == again["id"]
    assert sent(client, org, id="daily-report")["duplicate"] is True


def test_housekeeping_frees_old_ids_and_deletes_events_past_retention(client, org, connection):
    from app.events import services
    from workers import maintenance

    old, older, fresh = (sent(client, org, id=f"e{n}") for n in range(3))
    connection.execute(
        text(
            "UPDATE events SET received_at = now() - CASE id WHEN :old THEN interval '2 days' "
            "ELSE interval '9 days' END WHERE id IN (:old, :older)"
        ),
        {"old": old["id"], "older": older["id"]},
    )
    assert services.delete_expired(connection, 0, 1000) == 0  # 0: kept forever
    # Beat's housekeeping thread runs it (workers/maintenance.py).
    [job] = [job for job in maintenance.housekeeping_jobs() if job.name == "events"]
    job.run()
    rows = dict(
        connection.execute(
            text("SELECT event_id, dedupe_key FROM events WHERE org_id = :org"), {"org": org.id}
        ).all()
    )
    assert rows == {"e0": None, "e2": "e2"}
    assert fresh["id"]


# ---------------------------------------------------------------------------------------------
# Checks, roles, tenancy


def test_malformed_events_are_422_by_pointer(client, org, connection):
    cases = [
        ({"name": "bad name"}, "/name"),
        ({"name": ""}, "/name"),
        ({"name": "x" * 201}, "/name"),
        ({"name": "ok", "data": [1, 2]}, "/data"),
        ({"name": "ok", "data": "text"}, "/data"),
        ({"name": "ok", "data": {"blob": "x" * (256 * 1024)}}, "/data"),
        ({"name": "ok", "id": "x" * 201}, "/id"),
        ({"name": "ok", "id": ""}, "/id"),
        ({"name": "ok", "received_at": "2030-01-01T00:00:00Z"}, "/received_at"),
        ({}, "/name"),
    ]
    for body, pointer in cases:
        response = client.post(EVENTS, json=body, headers=org.headers)
        assert response.status_code == 422, (body, response.get_json())
        assert pointer in response.get_json()["errors"], (body, response.get_json())
        assert response.get_json()["hint"]
    nan = client.post(
        EVENTS,
        data=b'{"name": "ok", "data": {"n": NaN}}',
        headers={**org.headers, "Content-Type": "application/json"},
    )
    assert nan.status_code == 422 and "/data/n" in nan.get_json()["errors"]
    count = connection.execute(
        text("SELECT count(*) FROM events WHERE org_id = :org"), {"org": org.id}
    ).scalar()
    assert count == 0 and "event.send" not in audit_actions(connection, org)


def test_the_service_checks_what_no_schema_checked(client, org, connection):
    """accept() is also called without the HTTP schema in front of it."""
    from app.db import db
    from app.errors import ValidationFailed
    from app.events import services
    from app.orgs.services import authenticate

    principal = authenticate(f"Bearer {org.token}")
    with db.session() as session:
        for name, data, event_id, pointer in [
            ("bad name", {}, None, "/name"),
            ("ok", ["list"], None, "/data"),
            ("ok", {"n": float("nan")}, None, "/data/n"),
            ("ok", {"t": "a\x00b"}, None, "/data/t"),
            ("ok", {"t": "\ud800"}, None, "/data/t"),
            ("ok", {}, "x" * 201, "/id"),
        ]:
            with pytest.raises(ValidationFailed) as refused:
                services.accept(session, principal, name, data, event_id)
            assert pointer in refused.value.errors, (name, data, refused.value.errors)


def test_roles_who_may_send_and_read(client, org):
    for role in ("operator", "developer"):
        response = client.post(
            EVENTS, json={"name": f"{role}.sent"}, headers=bearer(make_token(org, role))
        )
        assert response.status_code == 202, (role, response.get_json())
    viewer = bearer(make_token(org, "viewer"))
    refused = client.post(EVENTS, json={"name": "x"}, headers=viewer)
    assert refused.status_code == 403 and "executions:submit" in refused.get_json()["message"]
    assert len(client.get(EVENTS, headers=viewer).get_json()) == 2
    assert client.post(EVENTS, json={"name": "x"}).status_code == 401


def test_another_organization_sees_none_and_starts_none(client, org, other_org, connection):
    make_agent(client, org)
    make_agent(client, other_org)
    ours = event_trigger(client, org)
    event_trigger(client, other_org)
    theirs = sent(client, other_org, data={"order": {"id": "B-1"}}, id="shared-id")
    assert [entry["trigger_id"] for entry in theirs["started"]] != [ours["id"]]
    # The same sender id in two organizations: two events.
    mine = sent(client, org, data={"order": {"id": "A-1"}}, id="shared-id")
    assert mine["duplicate"] is False
    assert [entry["trigger_id"] for entry in mine["started"]] == [ours["id"]]
    for ref in (theirs["id"], "shared-id"):
        read = client.get(f"{EVENTS}/{ref}", headers=org.headers).get_json()
        assert read.get("id") != theirs["id"], ref
    assert client.get(f"{EVENTS}/{theirs['id']}", headers=org.headers).status_code == 404
    assert [item["id"] for item in client.get(EVENTS, headers=org.headers).get_json()] == [
        mine["id"]
    ]
    executions = connection.execute(
        text("SELECT org_id, input FROM executions ORDER BY queued_at")
    ).all()
    by_org = {(row.org_id, row.input["text"]) for row in executions}
    assert by_org >= {(org.id, "A-1"), (other_org.id, "B-1")}
    assert (org.id, "B-1") not in by_org and (other_org.id, "A-1") not in by_org


# ---------------------------------------------------------------------------------------------
# Event triggers


def test_an_event_trigger_has_no_secret_and_no_url(client, org):
    make_agent(client, org)
    trigger = event_trigger(
        client, org, on_event={"name": "order.paid", "filter": {"order.currency": "EUR"}}
    )
    assert "secret" not in trigger and trigger["url"] is None
    assert trigger["on_event"] == {"name": "order.paid", "filter": {"order.currency": "EUR"}}
    read = client.get(f"/api/v1/triggers/{trigger['id']}", headers=org.headers).get_json()
    assert read["on_event"] == trigger["on_event"] and read["url"] is None
    hook = client.post(f"/hooks/{trigger['id']}", data=b"{}")
    assert hook.status_code == 404
    webhook = client.post(
        "/api/v1/triggers",
        json={"name": "hook", "target": {"agent": "echo"}, "input": {"text": "x"}},
        headers=org.headers,
    ).get_json()
    assert webhook["on_event"] is None and webhook["secret"].startswith("whsec_")


def test_event_trigger_definitions_are_checked(client, org):
    make_agent(client, org)
    cases = [
        ({"on_event": {"name": "bad name"}}, "/on_event/name"),
        ({"on_event": {}}, "/on_event/name"),
        ({"on_event": {"name": "a", "filter": {"a..b": 1}}}, "/on_event/filter"),
        ({"on_event": {"name": "a", "filter": {"": 1}}}, "/on_event/filter"),
        ({"on_event": {"name": "a", "filter": []}}, "/on_event/filter"),
        (
            {"on_event": {"name": "a", "filter": {f"k{n}": n for n in range(33)}}},
            "/on_event/filter",
        ),
        ({"on_event": {"name": "a", "other": 1}}, "/on_event/other"),
        ({"input": {"text": "$.event.order.id"}}, "/input/text"),
        ({"input": {"text": "$.event..x"}}, "/input/text"),
        ({"input": {"count": 3}}, "/input"),
    ]
    for overrides, pointer in cases:
        body = {
            "name": "t",
            "target": {"agent": "echo"},
            "input": {"text": "$.event.data.x"},
            "on_event": {"name": "a"},
            **overrides,
        }
        response = client.post("/api/v1/triggers", json=body, headers=org.headers)
        assert response.status_code == 422, (overrides, response.get_json())
        errors = response.get_json()["errors"]
        assert any(key.startswith(pointer) for key in errors), (overrides, errors)


def test_an_event_starts_its_triggers_with_the_event_in_their_input(client, org, connection):
    make_agent(client, org)
    trigger = event_trigger(
        client,
        org,
        input={"text": "$.event.data.order.id", "count": "$.event.data.items[1].n"},
    )
    named = event_trigger(
        client, org, name="by-name", input={"text": "$.event.name"}, target={"agent": "echo"}
    )
    body = sent(
        client,
        org,
        data={"order": {"id": "A-7"}, "items": [{"n": 1}, {"n": 3}]},
        id="order-7",
    )
    started = {entry["trigger_id"]: entry for entry in body["started"]}
    assert set(started) == {trigger["id"], named["id"]}
    first = client.get(
        f"/api/v1/executions/{started[trigger['id']]['execution_id']}", headers=org.headers
    ).get_json()
    assert first["input"] == {"text": "A-7", "count": 3} and first["status"] == "queued"
    second = client.get(
        f"/api/v1/executions/{started[named['id']]['execution_id']}", headers=org.headers
    ).get_json()
    assert second["input"] == {"text": "order.paid"}
    dispatched = connection.execute(
        text("SELECT count(*) FROM executions WHERE id = ANY(:ids) AND dispatched_at IS NOT NULL"),
        {"ids": [entry["execution_id"] for entry in body["started"]]},
    ).scalar()
    assert dispatched == 2
    stored = client.get(f"{EVENTS}/{body['id']}", headers=org.headers).get_json()
    assert stored["started"] == body["started"]
    # Another event name starts none of them.
    assert sent(client, org, name="order.refunded", data={"order": {"id": "A-7"}})["started"] == []


def test_the_event_id_and_name_are_there_to_refer_to(client, org):
    make_agent(client, org)
    event_trigger(client, org, input={"text": "$.event.event_id"})
    body = sent(client, org, id="sender-7")
    [entry] = body["started"]
    execution = client.get(
        f"/api/v1/executions/{entry['execution_id']}", headers=org.headers
    ).get_json()
    assert execution["input"] == {"text": "sender-7"}


def test_a_filter_starts_only_on_matching_data(client, org):
    make_agent(client, org)
    trigger = event_trigger(
        client,
        org,
        on_event={
            "name": "order.paid",
            "filter": {"order.currency": "EUR", "order.lines.0.sku": "X", "vip": True},
        },
    )
    matching = {"order": {"id": "A", "currency": "EUR", "lines": [{"sku": "X"}]}, "vip": True}
    assert [e["trigger_id"] for e in sent(client, org, data=matching)["started"]] == [trigger["id"]]
    for data in (
        {**matching, "vip": 1},  # true is not 1
        {**matching, "order": {**matching["order"], "currency": "USD"}},
        {**matching, "order": {"id": "A", "currency": "EUR", "lines": []}},
        {"order": {"id": "A", "currency": "EUR", "lines": [{"sku": "X"}]}},
        {},
    ):
        assert sent(client, org, data=data)["started"] == [], data


def test_a_trigger_that_cannot_start_is_recorded_and_the_others_start(client, org, connection):
    make_agent(client, org)
    broken = event_trigger(client, org, name="broken", input={"text": "$.event.data.missing"})
    wrong_type = event_trigger(client, org, name="wrong-type", input={"text": "$.event.data.n"})
    working = event_trigger(client, org, name="working", input={"text": "$.event.data.ok"})
    body = sent(client, org, data={"ok": "fine", "n": 5})
    started = {entry["trigger_id"]: entry for entry in body["started"]}
    assert set(started) == {broken["id"], wrong_type["id"], working["id"]}
    missing = started[broken["id"]]["error"]
    assert missing["type"] == "reference_not_found" and "/input/text" in missing["message"]
    assert missing["hint"] and "execution_id" not in started[broken["id"]]
    invalid = started[wrong_type["id"]]["error"]
    assert invalid["type"] == "invalid_input" and invalid["hint"]
    execution_id = started[working["id"]]["execution_id"]
    rows = connection.execute(
        text("SELECT id, input FROM executions WHERE org_id = :org"), {"org": org.id}
    ).all()
    assert [(str(row.id), row.input) for row in rows] == [(execution_id, {"text": "fine"})]
    stored = client.get(f"{EVENTS}/{body['id']}", headers=org.headers).get_json()
    assert {e["trigger_id"]: e for e in stored["started"]} == started


def test_an_archived_target_is_recorded_not_fatal(client, org):
    make_agent(client, org)
    trigger = event_trigger(client, org)
    assert client.delete("/api/v1/agents/echo", headers=org.headers).status_code == 204
    [entry] = sent(client, org, data={"order": {"id": "A"}})["started"]
    assert entry["trigger_id"] == trigger["id"] and entry["error"]["type"] == "conflict"


def test_a_quota_refusal_is_recorded_per_trigger(client, org, connection):
    make_agent(client, org)
    event_trigger(client, org)
    connection.execute(
        text("UPDATE organizations SET max_queued = 1 WHERE id = :id"), {"id": org.id}
    )
    queued = client.post(
        "/api/v1/agents/echo/executions", json={"input": {"text": "x"}}, headers=org.headers
    )
    assert queued.status_code == 202, queued.get_json()
    [entry] = sent(client, org, data={"order": {"id": "A"}})["started"]
    assert entry["error"]["type"] == "quota_exceeded", entry
    assert "max_queued" in entry["error"]["message"] and entry["error"]["hint"]
    count = connection.execute(
        text("SELECT count(*) FROM executions WHERE org_id = :org"), {"org": org.id}
    ).scalar()
    assert count == 1


def test_an_event_trigger_starts_a_chain(client, org, connection):
    make_chain(client, org)
    trigger = event_trigger(
        client, org, target={"chain": "pair"}, input={"value": "$.event.data.amount"}
    )
    [entry] = sent(client, org, data={"amount": 40})["started"]
    assert entry["trigger_id"] == trigger["id"] and "execution_id" not in entry
    run = connection.execute(
        text("SELECT input FROM chain_executions WHERE id = :id"),
        {"id": entry["chain_execution_id"]},
    ).scalar_one()
    assert run == {"value": 40}


def test_an_event_writes_one_audit_event(client, org, connection):
    make_agent(client, org)
    event_trigger(client, org)
    before = audit_actions(connection, org)
    sent(client, org, data={"order": {"id": "A"}, "secret-ish": "not in the trail"})
    after = audit_actions(connection, org)
    assert after[len(before) :] == ["event.send"]
    draft = connection.execute(
        text("SELECT draft_head FROM audit_events WHERE org_id = :org AND action = 'event.send'"),
        {"org": org.id},
    ).scalar_one()
    assert "sha256" in draft and "not in the trail" not in draft


def test_a_database_failure_mid_event_leaves_nothing(app, client, org, connection):
    """PostgreSQL failing after the event's row was written (here: a statement cancelled while
    the triggers table is locked) answers 503, and the event is not stored."""
    from app.db import db

    connection.execute(text("SET LOCAL statement_timeout = '300ms'"))
    with db.engine.connect() as locker:
        locker.execute(text("LOCK TABLE triggers IN ACCESS EXCLUSIVE MODE"))
        response = send(client, org, data={"n": 1}, id="half")
        locker.rollback()
    assert response.status_code == 503, response.get_json()
    connection.execute(text("SET LOCAL statement_timeout = 0"))
    count = connection.execute(
        text("SELECT count(*) FROM events WHERE org_id = :org"), {"org": org.id}
    ).scalar()
    assert count == 0
    assert sent(client, org, id="half")["duplicate"] is False


# ---------------------------------------------------------------------------------------------
# Live: a real worker runs what an event started


def test_a_worker_runs_the_agent_an_event_started(live_client, live_org, other_live_org):
    make_agent(live_client, live_org)
    make_agent(live_client, other_live_org)
    event_trigger(live_client, live_org)
    theirs = event_trigger(live_client, other_live_org)
    body = sent(live_client, live_org, data={"order": {"id": "LIVE-1"}}, id="live-1")
    [entry] = body["started"]
    done = wait_for(live_client, live_org, entry["execution_id"])
    assert done["status"] == "succeeded", done
    assert done["input"] == {"text": "LIVE-1"} and done["output"]["echo"] == {"text": "LIVE-1"}
    # The other organization's trigger on the same name started nothing.
    listed = live_client.get("/api/v1/executions", headers=other_live_org.headers).get_json()
    assert listed == [] and theirs["id"] not in json.dumps(body)


def test_a_worker_runs_the_chain_an_event_started(live_client, live_org):
    from tests.workers.test_chains_runs import wait_chain

    make_chain(live_client, live_org)
    event_trigger(
        live_client, live_org, target={"chain": "pair"}, input={"value": "$.event.data.n"}
    )
    [entry] = sent(live_client, live_org, data={"n": 40})["started"]
    done = wait_chain(live_client, live_org, entry["chain_execution_id"])
    assert done["status"] == "succeeded", done
    assert done["output"] == {"value": 42}


def test_senders_racing_with_one_id_make_one_event(app, live_org):
    """Committed, concurrent requests: the unique key makes all but one a duplicate."""
    from concurrent.futures import ThreadPoolExecutor

    from app.db import db

    def post(_n):
        response = app.test_client().post(
            EVENTS, json={"name": "race", "id": "same", "data": {"n": _n}}, headers=live_org.headers
        )
        assert response.status_code == 202, response.get_json()
        return response.get_json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(post, range(8)))
    assert sorted(answer["duplicate"] for answer in answers) == [False] + [True] * 7
    assert len({answer["id"] for answer in answers}) == 1
    with db.hot() as conn:
        count = conn.execute(
            text("SELECT count(*) FROM events WHERE org_id = :org"), {"org": live_org.id}
        ).scalar()
    assert count == 1


def test_reencrypting_trigger_secrets_passes_over_event_triggers(client, org, connection):
    """An event trigger has no secret: `runyard secrets reencrypt` must not trip on it."""
    from app.db import db
    from app.secrets import services as secrets

    make_agent(client, org)
    event_trigger(client, org)
    with db.session() as session:
        _resealed, total = secrets.reencrypt_column(session, "triggers")
    webhooks = connection.execute(
        text("SELECT count(*) FROM triggers WHERE secret IS NOT NULL")
    ).scalar()
    assert total == webhooks
