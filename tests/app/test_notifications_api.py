"""Notification subscriptions through the API: create (secret once), read, change, delete, the
delivery log and redeliver; validation by pointer, roles, and another organization's 404."""

import uuid

import pytest
from sqlalchemy import text

from tests.conftest import bearer, make_token

URL = "http://127.0.0.2:9/hooks"


def subscribe(client, org, **body):
    body = {"name": "ops", "url": URL, "events": ["execution.failed"], **body}
    return client.post("/api/v1/notifications", json=body, headers=org.headers)


def test_create_shows_the_secret_once_and_reads_never_do(client, org):
    created = subscribe(client, org, events=["execution.failed", "chain.failed"])
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    assert body["secret"].startswith("whsec_") and len(body["secret"]) > 30
    assert body["events"] == ["chain.failed", "execution.failed"]
    assert body["filter"] == {}
    one = client.get(f"/api/v1/notifications/{body['id']}", headers=org.headers).get_json()
    assert "secret" not in one and one["url"] == URL
    listed = client.get("/api/v1/notifications", headers=org.headers)
    assert [item["id"] for item in listed.get_json()] == [body["id"]]
    assert "secret" not in listed.get_json()[0]
    assert '"total": 1' in listed.headers["X-Pagination"]


def test_patch_and_delete(client, org):
    created = subscribe(client, org).get_json()
    changed = client.patch(
        f"/api/v1/notifications/{created['id']}",
        json={"events": ["execution.succeeded"], "name": "ops-2"},
        headers=org.headers,
    )
    assert changed.status_code == 200, changed.get_json()
    assert changed.get_json()["events"] == ["execution.succeeded"]
    assert changed.get_json()["name"] == "ops-2"
    gone = client.delete(f"/api/v1/notifications/{created['id']}", headers=org.headers)
    assert gone.status_code == 204
    again = client.get(f"/api/v1/notifications/{created['id']}", headers=org.headers)
    assert again.status_code == 404


def test_an_unknown_event_is_a_422_by_pointer(client, org):
    response = subscribe(client, org, events=["execution.failed", "execution.exploded"])
    assert response.status_code == 422
    assert list(response.get_json()["errors"]) == ["/events/1"]


def test_the_filter_names_agents_of_the_organization(client, org):
    agent = {
        "name": "echo",
        "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
    }
    assert client.post("/api/v1/agents", json=agent, headers=org.headers).status_code == 201
    ok = subscribe(client, org, filter={"agents": ["echo"]})
    assert ok.status_code == 201 and ok.get_json()["filter"] == {"agents": ["echo"]}
    unknown = subscribe(client, org, name="other", filter={"agents": ["echo", "nope"]})
    assert unknown.status_code == 422
    assert list(unknown.get_json()["errors"]) == ["/filter/agents/1"]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://10.0.0.1/hook", "10.0.0.1 is a private address"),
        ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
        ("http://[::ffff:127.0.0.1]:8080/x", "IPv6 form of a loopback"),
        ("ftp://example.com/x", "the scheme must be http or https"),
        ("http:///path-only", "the URL has no host"),
    ],
)
def test_a_url_the_guard_refuses_is_a_422(client, org, url, says):
    response = subscribe(client, org, url=url)
    assert response.status_code == 422, response.get_json()
    assert says in response.get_json()["errors"]["/url"][0]


def test_a_refused_url_cannot_come_in_by_patch(client, org):
    created = subscribe(client, org).get_json()
    response = client.patch(
        f"/api/v1/notifications/{created['id']}",
        json={"url": "http://192.168.1.1/"},
        headers=org.headers,
    )
    assert response.status_code == 422
    assert "/url" in response.get_json()["errors"]


def test_duplicate_name_is_a_409(client, org):
    assert subscribe(client, org).status_code == 201
    assert subscribe(client, org).status_code == 409


@pytest.mark.parametrize("role", ["operator", "viewer"])
def test_only_admin_and_developer_manage_notifications(client, org, role):
    created = subscribe(client, org).get_json()
    headers = bearer(make_token(org, role))
    assert subscribe(client, org).status_code in (201, 409)  # the admin still may
    for response in (
        client.get("/api/v1/notifications", headers=headers),
        client.get(f"/api/v1/notifications/{created['id']}", headers=headers),
        client.post(
            "/api/v1/notifications",
            json={"name": "x", "url": URL, "events": ["quota.exceeded"]},
            headers=headers,
        ),
        client.delete(f"/api/v1/notifications/{created['id']}", headers=headers),
        client.get(f"/api/v1/notifications/{created['id']}/deliveries", headers=headers),
    ):
        assert response.status_code == 403, response.get_json()
    developer = bearer(make_token(org, "developer"))
    assert client.get("/api/v1/notifications", headers=developer).status_code == 200


def _event(connection, org, notification_id, status="failed"):
    return connection.execute(
        text(
            "INSERT INTO notification_events (org_id, notification_id, type, data, status, "
            "attempts, last_status_code, last_error) VALUES (:org, :n, 'quota.exceeded', "
            "'{\"limit\": \"max_queued\"}', :status, 3, 503, 'HTTP 503: down') RETURNING id"
        ),
        {"org": org.id, "n": notification_id, "status": status},
    ).scalar()


def test_the_delivery_log_and_redeliver(client, org, connection):
    created = subscribe(client, org, events=["quota.exceeded"]).get_json()
    event_id = _event(connection, org, created["id"])
    log = client.get(f"/api/v1/notifications/{created['id']}/deliveries", headers=org.headers)
    assert log.status_code == 200
    [entry] = log.get_json()
    assert entry["event_id"] == str(event_id)
    assert entry["status"] == "failed" and entry["attempts"] == 3
    assert entry["last_status_code"] == 503 and entry["last_error"] == "HTTP 503: down"
    assert entry["next_attempt_at"] is None and entry["delivered_at"] is None
    again = client.post(
        f"/api/v1/notifications/{created['id']}/deliveries/{event_id}/redeliver",
        headers=org.headers,
    )
    assert again.status_code == 202, again.get_json()
    assert again.get_json() == {"event_id": str(event_id), "status": "pending"}
    [entry] = client.get(
        f"/api/v1/notifications/{created['id']}/deliveries", headers=org.headers
    ).get_json()
    assert entry["status"] == "pending" and entry["next_attempt_at"] is not None
    missing = client.post(
        f"/api/v1/notifications/{created['id']}/deliveries/{uuid.uuid4()}/redeliver",
        headers=org.headers,
    )
    assert missing.status_code == 404


def test_another_organization_gets_404_everywhere(client, org, other_org, connection):
    created = subscribe(client, org, events=["quota.exceeded"]).get_json()
    event_id = _event(connection, org, created["id"])
    base = f"/api/v1/notifications/{created['id']}"
    for response in (
        client.get(base, headers=other_org.headers),
        client.patch(base, json={"name": "mine"}, headers=other_org.headers),
        client.delete(base, headers=other_org.headers),
        client.get(f"{base}/deliveries", headers=other_org.headers),
        client.post(f"{base}/deliveries/{event_id}/redeliver", headers=other_org.headers),
    ):
        assert response.status_code == 404, response.get_json()
    assert client.get("/api/v1/notifications", headers=other_org.headers).get_json() == []
    # And an event of one subscription is not found through another of the same organization.
    second = subscribe(client, org, name="second").get_json()
    response = client.post(
        f"/api/v1/notifications/{second['id']}/deliveries/{event_id}/redeliver",
        headers=org.headers,
    )
    assert response.status_code == 404


def _types(client, org, notification):
    log = client.get(f"/api/v1/notifications/{notification['id']}/deliveries", headers=org.headers)
    return [entry["type"] for entry in log.get_json()]


def test_a_pause_and_a_cancel_write_their_events_with_the_change(client, org):
    agent = {"name": "echo", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}}
    assert client.post("/api/v1/agents", json=agent, headers=org.headers).status_code == 201
    hook = subscribe(
        client, org, events=["schedule.paused", "execution.cancelled", "execution.failed"]
    ).get_json()
    schedule = {"name": "nightly", "target": {"agent": "echo"}, "cron": "0 2 * * *"}
    assert client.post("/api/v1/schedules", json=schedule, headers=org.headers).status_code == 201
    assert client.post("/api/v1/schedules/nightly/pause", headers=org.headers).status_code == 200
    # Pausing a paused schedule changes nothing, and says nothing.
    assert client.post("/api/v1/schedules/nightly/pause", headers=org.headers).status_code == 200
    assert _types(client, org, hook) == ["schedule.paused"]
    execution = client.post(
        "/api/v1/agents/echo/executions", json={"input": {}}, headers=org.headers
    ).get_json()
    cancel = client.post(f"/api/v1/executions/{execution['id']}/cancel", headers=org.headers)
    assert cancel.status_code == 202
    assert sorted(_types(client, org, hook)) == ["execution.cancelled", "schedule.paused"]


def test_an_organization_without_subscriptions_writes_no_events(client, org, other_org, connection):
    subscribe(client, other_org, events=["execution.cancelled"])
    agent = {"name": "echo", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}}
    assert client.post("/api/v1/agents", json=agent, headers=org.headers).status_code == 201
    execution = client.post(
        "/api/v1/agents/echo/executions", json={"input": {}}, headers=org.headers
    ).get_json()
    client.post(f"/api/v1/executions/{execution['id']}/cancel", headers=org.headers)
    count = connection.execute(text("SELECT count(*) FROM notification_events")).scalar()
    assert count == 0


def test_an_execution_superseded_while_queued_writes_its_cancelled_event(client, org):
    agent = {
        "name": "latest",
        "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
        "concurrency": {"limit": 1, "on_limit": "cancel_running"},
    }
    assert client.post("/api/v1/agents", json=agent, headers=org.headers).status_code == 201
    hook = subscribe(client, org, events=["execution.cancelled"]).get_json()
    first, second = (
        client.post(
            "/api/v1/agents/latest/executions", json={"input": {}}, headers=org.headers
        ).get_json()
        for _ in range(2)
    )
    superseded = client.get(f"/api/v1/executions/{first['id']}", headers=org.headers).get_json()
    assert superseded["status"] == "cancelled" and superseded["error"]["type"] == "superseded"
    log = client.get(f"/api/v1/notifications/{hook['id']}/deliveries", headers=org.headers)
    assert [entry["type"] for entry in log.get_json()] == ["execution.cancelled"]
    assert second["status"] == "queued"


def test_ended_deliveries_count_once_and_old_ones_go_with_retention(client, org, connection):
    from app.notifications import delivery

    created = subscribe(client, org, events=["quota.exceeded"]).get_json()
    first, second, third = (_event(connection, org, created["id"], "pending") for _ in range(3))

    def totals():
        query = text("SELECT status, events FROM notification_totals")
        return dict(connection.execute(query).all())

    before = totals()
    delivery.delivered(connection, [(first, 204), (second, 200)])
    delivery.not_delivered(
        connection, third, code=None, error="refused", delay=1, window=60, final=True
    )
    counted = totals()
    assert counted.get("delivered", 0) - before.get("delivered", 0) == 2
    assert counted.get("failed", 0) - before.get("failed", 0) == 1
    # A redeliver makes one pending again: what was counted stays counted (a counter).
    again = client.post(
        f"/api/v1/notifications/{created['id']}/deliveries/{first}/redeliver",
        headers=org.headers,
    )
    assert again.status_code == 202
    assert totals() == counted
    # Retention takes the events that ended past the organization's retention, not the pending.
    connection.execute(
        text("UPDATE notification_events SET created_at = now() - interval '40 days'")
    )
    assert delivery.delete_expired(connection, 30, 100) == 2
    log = client.get(f"/api/v1/notifications/{created['id']}/deliveries", headers=org.headers)
    assert [entry["event_id"] for entry in log.get_json()] == [str(first)]
    assert delivery.delete_expired(connection, 0, 100) == 0  # 0 keeps everything
