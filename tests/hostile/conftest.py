"""The hostile-input suite's helpers: the app's routes, one object of every kind, the error shape.

Routes are enumerated from `app.url_map`, so a new route is covered (or makes a test fail) the day
it appears.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import text

from tests.app.test_triggers_api import signed
from tests.app.wallets_helpers import CUSTOMER, fake_engine, paying_agent, running_execution
from tests.conftest import unserved_queue

ERROR_KEYS = {"code", "status", "message", "errors", "hint"}
PUBLIC_PREFIXES = ("/api/v1/openapi.json", "/api/v1/docs", "/api/v1/swagger-ui")
BODY_METHODS = ("POST", "PATCH", "PUT")


@dataclass(frozen=True)
class Route:
    rule: str
    method: str

    @property
    def arguments(self) -> list[str]:
        return re.findall(r"<(?:[^:>]+:)?([^>]+)>", self.rule)


def app_routes(app) -> list[Route]:
    """Every (rule, method) the app serves, HEAD and OPTIONS aside."""
    found = {
        Route(rule.rule, method)
        for rule in app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    return sorted(found, key=lambda route: (route.rule, route.method))


def api_routes(app) -> list[Route]:
    """The token-protected ones: /api/v1 but the spec, the docs and their assets."""
    return [
        route
        for route in app_routes(app)
        if route.rule.startswith("/api/v1") and not route.rule.startswith(PUBLIC_PREFIXES)
    ]


def fill(route: Route, values: dict[str, str]) -> str:
    """The route's path with each `<argument>` replaced by `values[argument]`."""
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda match: values[match.group(1)], route.rule)


def assert_error_shape(response, code: int) -> dict:
    body = response.get_json()
    assert response.status_code == code, (response.status_code, body)
    assert body is not None and set(body) >= ERROR_KEYS, body
    assert body["code"] == code and body["message"] and body["hint"], body
    assert isinstance(body["errors"], dict), body
    return body


@dataclass
class World:
    """One object of every kind in one organization, and the path values that name them."""

    agent: dict
    execution: dict
    chain: dict
    chain_execution: dict
    schedule: dict
    trigger: dict
    notification: dict
    event_id: str
    secret: dict
    token: dict
    org_name: str
    # An event sent to POST /api/v1/events (with a sender's id).
    sent_event: dict
    document: dict
    # Two decisions awaiting approval (the agent "payer"'s): one to approve, one to reject.
    decisions: dict

    def values_for(self, route: Route, by: str = "name") -> dict[str, str]:
        """Path values naming this world's objects (by name or by id where a route takes
        either), chosen by the route's first segment."""
        ref = {kind: getattr(self, kind)[by] for kind in ("agent", "chain", "schedule", "trigger")}
        by_segment = {
            "agents": {"ref": ref["agent"], "version": "1.0.1", "key": STATE_KEY},
            "executions": {"execution_id": self.execution["id"]},
            "chains": {"ref": ref["chain"], "version": "1.0.0"},
            "chain-executions": {"execution_id": self.chain_execution["id"]},
            "schedules": {"ref": ref["schedule"]},
            "triggers": {"ref": ref["trigger"]},
            "hooks": {"trigger_id": self.trigger["id"]},
            "notifications": {
                "notification_id": self.notification["id"],
                "event_id": self.event_id,
            },
            "secrets": {"name": self.secret["name"]},
            "tokens": {"token_id": self.token["id"]},
            # By its id, or by the sender's id.
            "events": {"ref": self.sent_event["id" if by == "id" else "event_id"]},
            # The world's agent is private: the catalog runs it for us (our own), and to another
            # organization has no such agent (a 404), as for any object of ours it names.
            "catalog": {"org": self.org_name, "agent": self.agent["name"]},
            "documents": {"document_id": self.document["id"]},
            "decisions": {
                "decision_id": str(
                    self.decisions["reject" if route.rule.endswith("/reject") else "approve"].id
                )
            },
        }
        return by_segment[route.rule.removeprefix("/api/v1").split("/")[1]]


# The key of the world agent's state entry.
STATE_KEY = "cursor"
AGENT = {
    "name": "echo",
    "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
    "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
    # POST /api/v1/executions assigns by it.
    "capabilities": ["nlp"],
}


def _created(response, code: int) -> dict:
    assert response.status_code == code, response.get_json()
    return response.get_json()


def build_world(client, org, queue: str) -> World:
    """One object of every kind in `org`. Its agents' executions go to `queue`, which no worker
    serves (tests.conftest.unserved_queue): they stay as the world leaves them (queued, or the
    payer's two set `running` by hand for their decisions) until a test ends them."""
    headers = org.headers
    agent = _created(
        client.post("/api/v1/agents", json={**AGENT, "queue": queue}, headers=headers), 201
    )
    # A second version, so version routes have one that is not the first.
    _created(client.patch("/api/v1/agents/echo", json={"config": {"v": 2}}, headers=headers), 200)
    execution = _created(
        client.post("/api/v1/agents/echo/executions", json={"input": {}}, headers=headers), 202
    )
    chain = _created(
        client.post(
            "/api/v1/chains",
            json={"name": "pipeline", "steps": [{"name": "one", "agent": "echo"}]},
            headers=headers,
        ),
        201,
    )
    chain_execution = _created(
        client.post("/api/v1/chains/pipeline/executions", json={"input": {}}, headers=headers),
        202,
    )
    schedule = _created(
        client.post(
            "/api/v1/schedules",
            json={"name": "nightly", "target": {"agent": "echo"}, "cron": "0 2 * * *"},
            headers=headers,
        ),
        201,
    )
    trigger = _created(
        client.post(
            "/api/v1/triggers",
            json={"name": "on-event", "target": {"agent": "echo"}, "input": {}},
            headers=headers,
        ),
        201,
    )
    notification = _created(
        client.post(
            "/api/v1/notifications",
            json={"name": "ops", "url": "http://127.0.0.2:9/", "events": ["execution.cancelled"]},
            headers=headers,
        ),
        201,
    )
    # A cancelled execution of its own gives the notification an event (in the cancel's CTE).
    # Its agent's queue has no worker: it is still queued when the cancel comes.
    _created(
        client.post(
            "/api/v1/agents", json={**AGENT, "name": "parked", "queue": queue}, headers=headers
        ),
        201,
    )
    cancelled = _created(
        client.post("/api/v1/agents/parked/executions", json={"input": {}}, headers=headers), 202
    )
    _created(client.post(f"/api/v1/executions/{cancelled['id']}/cancel", headers=headers), 202)
    [event] = _created(
        client.get(f"/api/v1/notifications/{notification['id']}/deliveries", headers=headers),
        200,
    )
    secret = _created(
        client.put("/api/v1/secrets/api-key", json={"value": "s3cr3t-value"}, headers=headers),
        200,
    )
    _created(
        client.put(f"/api/v1/agents/echo/state/{STATE_KEY}", json={"value": 1}, headers=headers),
        200,
    )
    token = _created(
        client.post("/api/v1/tokens", json={"name": "reader", "role": "viewer"}, headers=headers),
        201,
    )
    sent_event = _created(
        client.post(
            "/api/v1/events",
            json={"name": "order.paid", "data": {"order": 1}, "id": "world-event"},
            headers=headers,
        ),
        202,
    )
    document = _created(upload_document(client, org), 201)
    # An agent with a wallet and a policy, whose transfers over approval_over await an answer
    # (the world's own agent, echo, has no wallet: POST .../wallet makes one).
    # Here, not at the top: this conftest loads before pytest_configure picks the run's Redis
    # database when tests/hostile is named on the command line, and app.wallets imports the
    # Celery app, which would keep the Redis URL of the environment.
    from app.wallets import transfers

    paying_agent(client, org, queue=queue)
    decisions = {
        answer: transfers.decide(
            running_execution(client, org), 1, "refund", "base", CUSTOMER, "75", answer
        )
        for answer in ("approve", "reject")
    }
    return World(
        agent,
        execution,
        chain,
        chain_execution,
        schedule,
        trigger,
        notification,
        event["event_id"],
        secret,
        token,
        org.name,
        sent_event,
        document,
        decisions,
    )


def upload_document(client, org, headers=None):
    """A document upload: its body is a file, not JSON (tests/hostile/test_bodies.py RAW)."""
    return client.post(
        "/api/v1/documents",
        query_string={"name": "notes.txt"},
        data=b"some notes\n",
        headers={**(headers or org.headers), "Content-Type": "text/plain"},
    )


@pytest.fixture(autouse=True)
def wallet_service():
    """A fake wallet service for every hostile test: wallets are made, never a 502."""
    with fake_engine() as engine:
        yield engine


@pytest.fixture
def world(client, org) -> Iterator[World]:
    """The world inside the test's transaction (rolled back after)."""
    with unserved_queue("hostile-world") as queue:
        yield build_world(client, org, queue)


@pytest.fixture
def live_world(app, live_org) -> Iterator[World]:
    """The world in a committed organization, for the OpenAPI fuzz and the document check,
    whose requests commit in transactions of their own. Its execution and chain execution are
    ended (finish_world), so the rerun routes reach past their 409."""
    with unserved_queue("hostile-world") as queue:
        world = build_world(app.test_client(), live_org, queue)
        finish_world(world)
        yield world


def finish_world(world) -> None:
    """Reruns take finished originals only: end the world's execution and chain execution as a
    worker would have (no worker runs here)."""
    from app.db import db

    with db.hot() as conn:
        conn.execute(
            text("UPDATE executions SET status = 'failed', finished_at = now() WHERE id = :id"),
            {"id": world.execution["id"]},
        )
        conn.execute(
            text(
                "UPDATE chain_executions SET status = 'failed', finished_at = now() WHERE id = :id"
            ),
            {"id": world.chain_execution["id"]},
        )


def hook_headers(world: World, body: bytes) -> dict[str, str]:
    """A valid signature, so a delivery gets as far as reading its body."""
    return signed(world.trigger["secret"], body)
