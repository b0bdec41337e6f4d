"""Every state-changing route writes exactly one audit event, and the chain holds after all of
them. Routes are enumerated from the app: a new write route fails here until it is placed in
one of the phases below (and writes its event)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from app.audit import services as audit
from app.db import db
from tests.hostile.conftest import Route, app_routes, fill, finish_world, upload_document
from tests.hostile.test_bodies import HOOK, RAW, valid_bodies

WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# Acts on the world's queued execution and chain execution, before they are finished.
CANCELS = [
    Route("/api/v1/executions/<execution_id>/cancel", "POST"),
    Route("/api/v1/chain-executions/<execution_id>/cancel", "POST"),
]
# Rerun finished work (finish_world ends it first).
RERUNS = [
    Route("/api/v1/executions/<execution_id>/rerun", "POST"),
    Route("/api/v1/executions/rerun", "POST"),
    Route("/api/v1/chain-executions/<execution_id>/rerun", "POST"),
]
ACTIONS = [
    Route("/api/v1/schedules/<ref>/pause", "POST"),
    Route("/api/v1/schedules/<ref>/resume", "POST"),
    Route("/api/v1/schedules/<ref>/trigger", "POST"),
    Route("/api/v1/notifications/<notification_id>/deliveries/<event_id>/redeliver", "POST"),
    Route("/api/v1/decisions/<decision_id>/approve", "POST"),
    Route("/api/v1/decisions/<decision_id>/reject", "POST"),
]
# Their body is a file, not JSON.
UPLOADS = [Route("/api/v1/documents", "POST")]
# Last: they take the world's objects away.
REMOVALS = [
    Route("/api/v1/documents/<document_id>", "DELETE"),
    Route("/api/v1/schedules/<ref>", "DELETE"),
    Route("/api/v1/triggers/<ref>", "DELETE"),
    Route("/api/v1/notifications/<notification_id>", "DELETE"),
    Route("/api/v1/secrets/<name>", "DELETE"),
    Route("/api/v1/agents/<ref>/state/<key>", "DELETE"),
    Route("/api/v1/tokens/<token_id>", "DELETE"),
    Route("/api/v1/chains/<ref>", "DELETE"),
    Route("/api/v1/agents/<ref>", "DELETE"),
]
BODIES = {Route("/api/v1/executions/rerun", "POST"): {"filter": {"status": ["failed"]}}}


def _head(org) -> int:
    """Events written, sealed or not."""
    with db.hot() as conn:
        return conn.execute(
            text("SELECT count(*) FROM audit_events WHERE org_id = :org"), {"org": org.id}
        ).scalar_one()


def _write_routes(app) -> set[Route]:
    return {
        route
        for route in app_routes(app)
        if route.method in WRITE_METHODS and route.rule.startswith("/api/v1") and route != HOOK
    }


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "idempotency-key"])
def test_every_write_route_writes_one_event_and_the_chain_holds(app, client, org, world, keyed):
    """Also with an Idempotency-Key, where the request runs in one transaction that the
    route's session is a savepoint of: a change made beside the session must not be undone
    by the session's close."""
    creates = valid_bodies(world)
    phases = [
        [route for route in creates if route not in RERUNS],
        UPLOADS,
        ACTIONS,
        CANCELS,
        "finish",
        RERUNS,
        REMOVALS,
    ]
    placed = {route for phase in phases if phase != "finish" for route in phase}
    assert placed == _write_routes(app), "place every write route in a phase"
    for phase in phases:
        if phase == "finish":
            finish_world(world)
            continue
        for number, route in enumerate(phase):
            before = _head(org)
            body = BODIES.get(route, creates.get(route))
            headers = dict(org.headers)
            if keyed and route.method == "POST":
                headers["Idempotency-Key"] = f"audit-{id(phase)}-{number}"
            if route in RAW:
                response = upload_document(client, org, headers)
            else:
                response = client.open(
                    fill(route, world.values_for(route)),
                    method=route.method,
                    json=body,
                    headers=headers,
                )
            assert response.status_code < 300, (route, response.get_json())
            assert _head(org) == before + 1, route
    with db.session() as session:
        verdict = audit.verify(session, org.id)
    assert verdict.bad_seq is None, verdict
    assert verdict.count == _head(org)


def test_a_refused_request_writes_no_event(client, org, world):
    before = _head(org)
    response = client.post(
        "/api/v1/agents", json={"name": world.agent["name"], "runtime": {}}, headers=org.headers
    )
    assert response.status_code == 422
    response = client.post(
        f"/api/v1/agents/{world.agent['name']}/executions",
        json={"input": {"text": 5}},
        headers=org.headers,
    )
    assert response.status_code == 422
    assert _head(org) == before


def test_an_idempotent_replay_writes_no_second_event(client, org, world):
    headers = {**org.headers, "Idempotency-Key": "audit-once"}
    path = f"/api/v1/agents/{world.agent['name']}/executions"
    first = client.post(path, json={"input": {}}, headers=headers)
    before = _head(org)
    again = client.post(path, json={"input": {}}, headers=headers)
    assert again.headers.get("Idempotency-Replayed") == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    assert _head(org) == before
