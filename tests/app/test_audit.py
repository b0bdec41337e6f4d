"""The audit trail: what an event says, who reads it, created_by, and a chain that catches
tampering (in SQL, then with `runyard audit verify` as an operator runs it)."""

from __future__ import annotations

import hashlib
import json
import threading

from sqlalchemy import text

from app.audit import services as audit
from app.db import db
from tests.conftest import bearer, make_token
from tests.test_cli import runyard

AGENT = {
    "name": "audited",
    "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
    "input_schema": {"type": "object"},
}


def _events(client, org, **query) -> list[dict]:
    response = client.get("/api/v1/audit", query_string=query, headers=org.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_an_update_is_one_event_with_who_where_and_rfc6902_changes(client, org):
    client.post("/api/v1/agents", json=AGENT, headers=org.headers)
    response = client.patch(
        "/api/v1/agents/audited",
        json={"description": "now described", "timeout_seconds": 30},
        headers={**org.headers, "X-Request-Id": "req-42"},
        environ_base={"REMOTE_ADDR": "127.0.0.9"},
    )
    assert response.status_code == 200
    assert response.headers["X-Request-Id"] == "req-42"
    [event] = _events(client, org, action="agent.update")
    assert event["actor"]["token_name"] == "admin" and event["actor"]["role"] == "admin"
    assert event["object"] == {
        "type": "agent",
        "id": response.get_json()["id"],
        "name": "audited",
    }
    assert event["request_id"] == "req-42" and event["ip"] == "127.0.0.9"
    changes = {(op["op"], op["path"]): op.get("value") for op in event["changes"]}
    assert changes[("replace", "/description")] == "now described"
    assert changes[("replace", "/timeout_seconds")] == 30
    assert changes[("replace", "/current_version")] == "1.0.1"
    # The hash is what the contract says: SHA-256 of prev_hash and the canonical event.
    body = {key: value for key, value in event.items() if key != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert event["hash"] == hashlib.sha256((event["prev_hash"] + canonical).encode()).hexdigest()


def test_events_list_newest_first_filtered_and_paginated(client, org):
    client.post("/api/v1/agents", json=AGENT, headers=org.headers)
    for _ in range(3):
        client.post("/api/v1/agents/audited/executions", json={"input": {}}, headers=org.headers)
    events = _events(client, org)
    seqs = [event["seq"] for event in events]
    assert seqs == sorted(seqs, reverse=True) and seqs[-1] == 1  # org.create is seq 1
    assert events[-1]["action"] == "org.create" and "cli" in events[-1]["actor"]
    submits = _events(client, org, action="execution.submit", page_size=2)
    assert len(submits) == 2 and all(e["object"]["type"] == "execution" for e in submits)
    response = client.get(
        "/api/v1/audit", query_string={"action": "execution.submit"}, headers=org.headers
    )
    assert json.loads(response.headers["X-Pagination"])["total"] == 3
    one = submits[0]["object"]["id"]
    assert [e["seq"] for e in _events(client, org, object_id=one)] == [submits[0]["seq"]]
    token_id = submits[0]["actor"]["token_id"]
    assert len(_events(client, org, actor=token_id, action="execution.submit")) == 3
    assert _events(client, org, since="2999-01-01T00:00:00Z") == []


def test_only_an_admin_reads_the_trail_and_only_its_own(client, org, other_org):
    developer = make_token(org, "developer")
    response = client.get("/api/v1/audit", headers=bearer(developer))
    assert response.status_code == 403 and response.get_json()["hint"]
    client.post("/api/v1/agents", json=AGENT, headers=other_org.headers)
    assert not any(e["action"] == "agent.create" for e in _events(client, org))
    response = client.get("/api/v1/audit?action=Not%20an%20action", headers=org.headers)
    assert response.status_code == 422 and "action" in response.get_json()["errors"]


def test_a_batch_is_one_event_naming_its_executions(client, org):
    client.post("/api/v1/agents", json=AGENT, headers=org.headers)
    items = [{"input": {"n": n}} for n in range(50)]
    ids = client.post(
        "/api/v1/agents/audited/executions/batch", json={"items": items}, headers=org.headers
    ).get_json()["ids"]
    [event] = _events(client, org, action="execution.submit_batch")
    assert event["object"]["name"] == "audited"
    assert event["changes"] == [{"op": "add", "path": "/executions", "value": ids}]
    assert _events(client, org, action="execution.submit") == []


def test_what_tokens_make_carries_created_by(client, org):
    developer = make_token(org, "developer")
    headers = bearer(developer)
    client.post("/api/v1/agents", json=AGENT, headers=headers)
    execution = client.post(
        "/api/v1/agents/audited/executions", json={"input": {}}, headers=headers
    ).get_json()
    me = client.get("/api/v1/me", headers=headers).get_json()["token"]
    expected = {"token_id": me["id"], "token_name": "developer"}
    assert execution["created_by"] == expected
    fetched = client.get(f"/api/v1/executions/{execution['id']}", headers=headers).get_json()
    assert fetched["created_by"] == expected
    [version] = client.get("/api/v1/agents/audited/versions", headers=headers).get_json()
    assert version["created_by"] == expected
    schedule = client.post(
        "/api/v1/schedules",
        json={"name": "nightly", "target": {"agent": "audited"}, "cron": "0 2 * * *"},
        headers=headers,
    ).get_json()
    assert schedule["created_by"] == expected
    trigger = client.post(
        "/api/v1/triggers",
        json={"name": "hook", "target": {"agent": "audited"}, "input": {}},
        headers=headers,
    ).get_json()
    assert trigger["created_by"] == expected


# ---------------------------------------------------------------------------------------------
# Tampering, found by verify


def _three_events(client, org) -> None:
    client.post("/api/v1/agents", json=AGENT, headers=org.headers)
    client.patch("/api/v1/agents/audited", json={"description": "x"}, headers=org.headers)
    client.post("/api/v1/agents/audited/executions", json={"input": {}}, headers=org.headers)
    client.post("/api/v1/agents/audited/executions", json={"input": {}}, headers=org.headers)
    # Sealed (as beat does within a second): numbered, completed and hashed.
    assert audit.seal_now(org.id) == 5


def _verify(org, anchor=None) -> audit.Verdict:
    with db.session() as session:
        return audit.verify(session, org.id, anchor)


def _sql(statement: str, **params) -> None:
    with db.hot() as conn:
        conn.execute(text(statement), params)


def test_an_untouched_chain_holds(client, org):
    _three_events(client, org)
    assert _verify(org) == audit.Verdict(5)


def test_a_changed_event_is_named(client, org):
    _three_events(client, org)
    _sql(
        "UPDATE audit_events SET body = replace(body, '\"x\"', '\"y\"') "
        "WHERE org_id = :org AND seq = 3",
        org=org.id,
    )
    verdict = _verify(org)
    assert verdict.bad_seq == 3 and "changed" in verdict.reason and verdict.count == 2


def test_a_changed_filter_column_is_named(client, org):
    _three_events(client, org)
    _sql(
        "UPDATE audit_events SET action = 'agent.create' WHERE org_id = :org AND seq = 3",
        org=org.id,
    )
    assert _verify(org).bad_seq == 3


def test_a_removed_event_is_named(client, org):
    _three_events(client, org)
    _sql("DELETE FROM audit_events WHERE org_id = :org AND seq = 2", org=org.id)
    verdict = _verify(org)
    assert verdict.bad_seq == 2 and "missing" in verdict.reason


def test_a_removal_hidden_by_renumbering_is_named(client, org):
    _three_events(client, org)
    _sql("DELETE FROM audit_events WHERE org_id = :org AND seq = 2", org=org.id)
    # Renumbered, bodies too: the body's seq agrees, its prev_hash cannot.
    _sql(
        "UPDATE audit_events SET seq = seq - 1, "
        "body = replace(body, '\"seq\":' || seq || '}', '\"seq\":' || (seq - 1) || '}') "
        "WHERE org_id = :org AND seq > 2",
        org=org.id,
    )
    verdict = _verify(org)
    assert verdict.bad_seq == 2 and "prev_hash" in verdict.reason


def test_an_inserted_event_is_named(client, org):
    _three_events(client, org)
    _sql("UPDATE audit_events SET seq = seq + 100 WHERE org_id = :org AND seq >= 3", org=org.id)
    _sql("UPDATE audit_events SET seq = seq - 99 WHERE org_id = :org AND seq >= 103", org=org.id)
    _sql(
        "INSERT INTO audit_events (org_id, seq, at, action, object_type, object_id, actor, body, "
        "hash) SELECT org_id, 3, at, action, object_type, object_id, actor, body, hash "
        "FROM audit_events WHERE org_id = :org AND seq = 2",
        org=org.id,
    )
    verdict = _verify(org)
    assert verdict.bad_seq == 3


def test_a_cut_tail_is_named_by_the_head(client, org):
    _three_events(client, org)
    _sql("DELETE FROM audit_events WHERE org_id = :org AND seq = 5", org=org.id)
    verdict = _verify(org)
    assert verdict.bad_seq == 5 and "removed" in verdict.reason


def test_a_chain_rewritten_whole_is_caught_by_an_anchor(client, org):
    _three_events(client, org)
    with db.session() as session:
        anchor = audit.head(session, org.id)
    assert _verify(org, anchor) == audit.Verdict(5)
    # Someone with write access to every table changes event 3 and rehashes from there on,
    # head included: the chain holds on its own, the anchor kept elsewhere does not.
    _sql(
        "UPDATE audit_events SET body = replace(body, '\"x\"', '\"y\"') "
        "WHERE org_id = :org AND seq = 3",
        org=org.id,
    )
    with db.session() as session:
        rows = session.execute(
            text("SELECT seq, body FROM audit_events WHERE org_id = :org ORDER BY seq"),
            {"org": org.id},
        ).all()
    prev = "0" * 64
    for seq, body in rows:
        document = json.loads(body)
        document["prev_hash"] = prev
        body = audit.canonical(document)
        hashed = hashlib.sha256((prev + body).encode()).hexdigest()
        _sql(
            "UPDATE audit_events SET body = :body, hash = :hash WHERE org_id = :org AND seq = :seq",
            body=body,
            hash=hashed,
            org=org.id,
            seq=seq,
        )
        prev = hashed
    _sql("UPDATE audit_heads SET hash = :hash WHERE org_id = :org", hash=prev, org=org.id)
    assert _verify(org).bad_seq is None
    verdict = _verify(org, anchor)
    assert verdict.bad_seq == 5 and "anchor" in verdict.reason


# ---------------------------------------------------------------------------------------------
# Committed, concurrent, and the command an operator runs


def test_concurrent_submits_get_gapless_seqs_and_verify_names_a_tampered_event(app, live_org):
    client = app.test_client()
    client.post("/api/v1/agents", json=AGENT, headers=live_org.headers)
    failures: list = []

    def submit_many() -> None:
        for _ in range(25):
            response = client.post(
                "/api/v1/agents/audited/executions", json={"input": {}}, headers=live_org.headers
            )
            if response.status_code != 202:
                failures.append(response.get_json())

    submitting = threading.Event()
    submitting.set()

    def seal_meanwhile() -> None:
        # Two sealers at once, while submits commit, as beat and a reader would.
        while submitting.is_set():
            audit.seal_now(live_org.id)

    sealers = [threading.Thread(target=seal_meanwhile) for _ in range(2)]
    threads = [threading.Thread(target=submit_many) for _ in range(8)]
    for thread in sealers + threads:
        thread.start()
    for thread in threads:
        thread.join()
    submitting.clear()
    for thread in sealers:
        thread.join()
    audit.seal_now(live_org.id)
    assert failures == []
    with db.engine.connect() as conn:
        seqs = (
            conn.execute(
                text("SELECT seq FROM audit_events WHERE org_id = :org ORDER BY seq"),
                {"org": live_org.id},
            )
            .scalars()
            .all()
        )
    assert seqs == list(range(1, 203))  # org.create, agent.create, 200 submits

    result = runyard("audit", "verify", live_org.name)
    assert result.returncode == 0, result.stderr
    assert "202 events" in result.stdout
    head = runyard("audit", "head", live_org.name).stdout.strip()
    assert head.startswith("202:")

    with db.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE audit_events SET body = replace(body, 'execution.submit', "
                "'execution.cancel') WHERE org_id = :org AND seq = 150"
            ),
            {"org": live_org.id},
        )
    result = runyard("audit", "verify", live_org.name, "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["bad_seq"] == 150
    plain = runyard("audit", "verify", live_org.name, "--anchor", head)
    assert plain.returncode == 1 and plain.stdout.startswith("seq 150:")


def test_admin_commands_are_audited_as_the_os_user(app, live_org):
    result = runyard("orgs", "limits", live_org.name, "--max-queued", "500")
    assert result.returncode == 0, result.stderr
    client = app.test_client()
    [event] = _events(client, live_org, action="org.limits")
    assert set(event["actor"]) == {"cli"} and event["actor"]["cli"]
    assert {"op": "replace", "path": "/max_queued", "value": 500} in event["changes"] or {
        "op": "add",
        "path": "/max_queued",
        "value": 500,
    } in event["changes"]


def test_token_commands_are_audited_without_the_token(app, live_org):
    created = runyard("tokens", "create", live_org.name, "--role", "viewer", "--json")
    assert created.returncode == 0, created.stderr
    secret = json.loads(created.stdout)["token"]
    listed = json.loads(runyard("tokens", "list", live_org.name, "--json").stdout)
    [viewer] = [token for token in listed if token["role"] == "viewer"]
    assert runyard("tokens", "revoke", viewer["id"]).returncode == 0
    client = app.test_client()
    [made] = _events(client, live_org, action="token.create")
    [revoked] = _events(client, live_org, action="token.revoke")
    assert made["object"]["id"] == revoked["object"]["id"] == viewer["id"]
    assert {"op": "add", "path": "/role", "value": "viewer"} in made["changes"]
    assert set(made["actor"]) == {"cli"} == set(revoked["actor"])
    assert secret not in json.dumps(_events(client, live_org))


def test_verify_of_an_unknown_org_is_a_clear_error():
    result = runyard("audit", "verify", "no-such-org")
    assert result.returncode == 2 and "no organization" in result.stderr
    result = runyard("audit", "verify", "x", "--anchor", "nonsense")
    assert result.returncode == 2 and "SEQ:HASH" in result.stderr
