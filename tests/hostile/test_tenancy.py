"""Another organization's token: every route that names an object answers 404, and changes nothing.

Tokens that expired or were revoked: 401 on every /api/v1 route but the spec and the docs.
"""

from __future__ import annotations

import datetime as dt

import pytest

from app.orgs.services import hash_token
from tests.conftest import bearer, make_token
from tests.hostile.conftest import Route, api_routes, assert_error_shape, fill

# What the other organization sends to the routes that take a body: valid for its own objects.
BODIES = {
    Route("/api/v1/agents/<ref>", "PATCH"): {"description": "theirs now"},
    Route("/api/v1/agents/<ref>/executions", "POST"): {"input": {}},
    Route("/api/v1/agents/<ref>/executions/batch", "POST"): {"items": [{"input": {}}]},
    Route("/api/v1/chains/<ref>", "PATCH"): {"description": "theirs now"},
    Route("/api/v1/chains/<ref>/executions", "POST"): {"input": {}},
    Route("/api/v1/schedules/<ref>", "PATCH"): {"enabled": False},
    Route("/api/v1/executions/<execution_id>/rerun", "POST"): {},
    Route("/api/v1/chain-executions/<execution_id>/rerun", "POST"): {"from": "failed"},
    Route("/api/v1/notifications/<notification_id>", "PATCH"): {"url": "http://127.0.0.2:1/"},
    Route("/api/v1/agents/<ref>/rollback", "POST"): {"version": "1.0.0"},
    Route("/api/v1/chains/<ref>/rollback", "POST"): {"version": "1.0.0"},
    Route("/api/v1/secrets/<name>", "PUT"): {"value": "theirs now"},
    Route("/api/v1/catalog/<org>/<agent>/executions", "POST"): {"input": {}},
    Route("/api/v1/agents/<ref>/state/<key>", "PUT"): {"value": "theirs now"},
    Route("/api/v1/agents/<ref>/wallet", "POST"): {},
}
# Routes that name an object by a name of the caller's own namespace and make it when missing:
# another organization's token makes its own object (200), never touching ours.
UPSERTS = {Route("/api/v1/secrets/<name>", "PUT")}
# Every route naming an object; a new one fails test_every_object_route_is_covered until it is
# added here (with its body in BODIES if it takes one).
OBJECT_ROUTES = {
    Route("/api/v1/agents/<ref>", "GET"),
    Route("/api/v1/agents/<ref>", "PATCH"),
    Route("/api/v1/agents/<ref>", "DELETE"),
    Route("/api/v1/agents/<ref>/versions", "GET"),
    Route("/api/v1/agents/<ref>/versions/<version>", "GET"),
    Route("/api/v1/agents/<ref>/versions/<version>/diff", "GET"),
    Route("/api/v1/agents/<ref>/rollback", "POST"),
    Route("/api/v1/agents/<ref>/executions", "POST"),
    Route("/api/v1/agents/<ref>/executions/batch", "POST"),
    Route("/api/v1/agents/<ref>/stats", "GET"),
    Route("/api/v1/agents/<ref>/state", "GET"),
    Route("/api/v1/agents/<ref>/state/<key>", "GET"),
    Route("/api/v1/agents/<ref>/state/<key>", "PUT"),
    Route("/api/v1/agents/<ref>/state/<key>", "DELETE"),
    Route("/api/v1/executions/<execution_id>", "GET"),
    Route("/api/v1/executions/<execution_id>/cancel", "POST"),
    Route("/api/v1/executions/<execution_id>/rerun", "POST"),
    Route("/api/v1/executions/<execution_id>/attempts", "GET"),
    Route("/api/v1/executions/<execution_id>/journal", "GET"),
    Route("/api/v1/executions/<execution_id>/logs", "GET"),
    Route("/api/v1/executions/<execution_id>/events", "GET"),
    Route("/api/v1/chains/<ref>", "GET"),
    Route("/api/v1/chains/<ref>", "PATCH"),
    Route("/api/v1/chains/<ref>", "DELETE"),
    Route("/api/v1/chains/<ref>/versions", "GET"),
    Route("/api/v1/chains/<ref>/versions/<version>", "GET"),
    Route("/api/v1/chains/<ref>/versions/<version>/diff", "GET"),
    Route("/api/v1/chains/<ref>/rollback", "POST"),
    Route("/api/v1/chains/<ref>/executions", "POST"),
    Route("/api/v1/chain-executions/<execution_id>", "GET"),
    Route("/api/v1/chain-executions/<execution_id>/cancel", "POST"),
    Route("/api/v1/chain-executions/<execution_id>/rerun", "POST"),
    Route("/api/v1/chain-executions/<execution_id>/events", "GET"),
    Route("/api/v1/schedules/<ref>", "GET"),
    Route("/api/v1/schedules/<ref>", "PATCH"),
    Route("/api/v1/schedules/<ref>", "DELETE"),
    Route("/api/v1/schedules/<ref>/pause", "POST"),
    Route("/api/v1/schedules/<ref>/resume", "POST"),
    Route("/api/v1/schedules/<ref>/trigger", "POST"),
    Route("/api/v1/schedules/<ref>/history", "GET"),
    Route("/api/v1/triggers/<ref>", "GET"),
    Route("/api/v1/triggers/<ref>", "DELETE"),
    Route("/api/v1/notifications/<notification_id>", "GET"),
    Route("/api/v1/notifications/<notification_id>", "PATCH"),
    Route("/api/v1/notifications/<notification_id>", "DELETE"),
    Route("/api/v1/notifications/<notification_id>/deliveries", "GET"),
    Route("/api/v1/notifications/<notification_id>/deliveries/<event_id>/redeliver", "POST"),
    Route("/api/v1/secrets/<name>", "PUT"),
    Route("/api/v1/secrets/<name>", "DELETE"),
    Route("/api/v1/tokens/<token_id>", "DELETE"),
    Route("/api/v1/events/<ref>", "GET"),
    # It names another organization's agent by design: a private one (the world's) is a 404.
    Route("/api/v1/catalog/<org>/<agent>/executions", "POST"),
    Route("/api/v1/documents/<document_id>", "GET"),
    Route("/api/v1/documents/<document_id>", "DELETE"),
    Route("/api/v1/documents/<document_id>/content", "GET"),
    Route("/api/v1/agents/<ref>/wallet", "GET"),
    Route("/api/v1/agents/<ref>/wallet", "POST"),
    Route("/api/v1/decisions/<decision_id>", "GET"),
    Route("/api/v1/decisions/<decision_id>/approve", "POST"),
    Route("/api/v1/decisions/<decision_id>/reject", "POST"),
}


def test_every_object_route_is_covered(app):
    assert {route for route in api_routes(app) if route.arguments} == OBJECT_ROUTES


def snapshot(client, org, world) -> dict[str, object]:
    """What the owner sees of every object, and of every list."""
    seen: dict[str, object] = {}
    for route in sorted(OBJECT_ROUTES, key=lambda r: r.rule):
        if route.method == "GET":
            path = fill(route, world.values_for(route))
            answer = client.get(path, headers=org.headers)
            # A document's content is its bytes (an event stream is left unread: it stays open).
            is_bytes = answer.mimetype == "text/plain"
            seen[path] = answer.data if is_bytes else answer.get_json()
    for path in (
        "/api/v1/agents",
        "/api/v1/executions",
        "/api/v1/logs",
        "/api/v1/chains",
        "/api/v1/chain-executions",
        "/api/v1/schedules",
        "/api/v1/triggers",
        "/api/v1/notifications",
        "/api/v1/secrets",
        "/api/v1/events",
        "/api/v1/documents",
        "/api/v1/decisions",
    ):
        seen[path] = client.get(path, headers=org.headers).get_json()
    return seen


@pytest.mark.parametrize("by", ["name", "id"])
def test_another_organizations_token_gets_404_on_every_object_route(
    client, org, other_org, world, by
):
    before = snapshot(client, org, world)
    for route in sorted(OBJECT_ROUTES, key=lambda r: (r.rule, r.method)):
        response = client.open(
            fill(route, world.values_for(route, by=by)),
            method=route.method,
            json=BODIES.get(route),
            headers=other_org.headers,
        )
        if route in UPSERTS:
            assert response.status_code == 200 and response.get_json()["version"] == 1, route
        else:
            assert_error_shape(response, 404)
    assert snapshot(client, org, world) == before


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
def test_another_organizations_log_export_is_404(client, other_org, world, fmt):
    path = f"/api/v1/executions/{world.execution['id']}/logs?format={fmt}"
    assert_error_shape(client.get(path, headers=other_org.headers), 404)


def test_another_organizations_log_search_by_our_execution_is_empty(client, other_org, world):
    query = {"execution_id": world.execution["id"], "agent": world.agent["id"]}
    response = client.get("/api/v1/logs", query_string=query, headers=other_org.headers)
    assert response.status_code == 200 and response.get_json() == []


def test_another_organizations_lists_show_nothing_of_ours(app, client, org, other_org, world):
    ours = [
        world.agent["id"],
        world.execution["id"],
        world.chain["id"],
        world.chain_execution["id"],
        world.schedule["id"],
        world.trigger["id"],
        world.notification["id"],
        world.token["id"],
        world.sent_event["id"],
        world.document["id"],
        *(str(decision.id) for decision in world.decisions.values()),
    ]
    lists = [route for route in api_routes(app) if route.method == "GET" and not route.arguments]
    assert len(lists) >= 8
    for route in lists:
        response = client.get(route.rule, headers=other_org.headers)
        assert response.status_code == 200, (route, response.get_json())
        assert not any(object_id in response.get_data(as_text=True) for object_id in ours), route


def _revoked_token(org) -> str:
    from app.db import db
    from app.orgs import services
    from app.orgs.models import ApiToken

    token = make_token(org, "admin")
    with db.session() as session:
        row = session.query(ApiToken).filter_by(token_hash=hash_token(token)).one()
        services.revoke_token(session, row.id)
        session.commit()
    return token


def _expired_token(org) -> str:
    return make_token(org, "admin", expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))


@pytest.mark.parametrize("make", [_expired_token, _revoked_token], ids=["expired", "revoked"])
def test_expired_and_revoked_tokens_are_401_on_every_api_route(app, client, org, world, make):
    """The owner's own objects, so nothing but the token can be the fault."""
    headers = bearer(make(org))
    routes = api_routes(app)
    assert set(routes) > OBJECT_ROUTES
    for route in routes:
        response = client.open(
            fill(route, world.values_for(route)) if route.arguments else route.rule,
            method=route.method,
            json={} if route.method in ("POST", "PATCH") else None,
            headers=headers,
        )
        assert_error_shape(response, 401)
        assert response.headers["WWW-Authenticate"] == "Bearer"
    for public in ("/api/v1/openapi.json", "/api/v1/docs"):
        assert client.get(public, headers=headers).status_code == 200
