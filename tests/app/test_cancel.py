"""Cancel as one statement: a queued execution ends at once, a running one is asked to stop, and
a running one put back to `queued` meanwhile (a retry, the sweeper) is cancelled, never a 409.

Committed rows on an agent whose queue no worker serves: the test plays the worker itself."""

from __future__ import annotations

import threading
import uuid

from sqlalchemy import text

from app.db import db
from app.executions import store
from app.executions.spec import Claim
from tests.conftest import an_execution_update_waits_on_a_row_lock, wait_until

PARKED = {
    "name": "parked",
    "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
    "queue": "cancel-parked",
}
RETRY_ERROR = {"type": "runtime_error", "message": "attempt 1 failed"}


def _queued(client, org) -> str:
    if client.get("/api/v1/agents/parked", headers=org.headers).status_code == 404:
        created = client.post("/api/v1/agents", json=PARKED, headers=org.headers)
        assert created.status_code == 201, created.get_json()
    submitted = client.post(
        "/api/v1/agents/parked/executions", json={"input": {}}, headers=org.headers
    )
    assert submitted.status_code == 202, submitted.get_json()
    return submitted.get_json()["id"]


def _claim(execution_id: str) -> Claim:
    with db.hot() as conn:
        claimed = store.claim(conn, uuid.UUID(execution_id), "test-worker", 60)[0]
    assert claimed is not None
    return claimed


def _row(execution_id: str):
    with db.hot() as conn:
        return (
            conn.execute(
                text(
                    "SELECT status, attempt, cancel_requested_at, finished_at, lease_until, error "
                    "FROM executions WHERE id = :id"
                ),
                {"id": execution_id},
            )
            .mappings()
            .one()
        )


def _cancel(client, org, execution_id: str):
    return client.post(f"/api/v1/executions/{execution_id}/cancel", headers=org.headers)


def test_cancel_ends_a_queued_execution_at_once(app, live_org):
    client = app.test_client()
    execution_id = _queued(client, live_org)
    response = _cancel(client, live_org, execution_id)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["status"] == "cancelled"
    row = _row(execution_id)
    assert row["status"] == "cancelled" and row["error"]["type"] == "cancelled"
    assert row["finished_at"] is not None and row["cancel_requested_at"] is not None
    assert row["lease_until"] is None
    with db.hot() as conn:
        assert store.claim(conn, uuid.UUID(execution_id), "test-worker", 60)[0] is None
    again = _cancel(client, live_org, execution_id)
    assert again.status_code == 409 and again.get_json()["hint"], again.get_json()


def test_cancel_asks_a_running_execution_to_stop_and_leaves_its_end_to_the_worker(app, live_org):
    client = app.test_client()
    execution_id = _queued(client, live_org)
    claimed = _claim(execution_id)
    response = _cancel(client, live_org, execution_id)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["status"] == "running"
    row = _row(execution_id)
    asked_at = row["cancel_requested_at"]
    assert asked_at is not None and row["finished_at"] is None and row["error"] is None
    assert row["lease_until"] is not None and row["attempt"] == 1
    # Asked again: still 202, and the first request's time stands.
    assert _cancel(client, live_org, execution_id).status_code == 202
    assert _row(execution_id)["cancel_requested_at"] == asked_at
    # The worker records the end; the retry it might have made is refused after a cancel.
    with db.hot() as conn:
        assert not store.requeue_for_retry(
            conn, claimed, attempt_status="failed", error=RETRY_ERROR, usage={}
        )
        assert store.finish(
            conn, claimed, status="cancelled", output=None, error=RETRY_ERROR, usage={}
        )
    assert _cancel(client, live_org, execution_id).status_code == 409


def test_cancel_catches_a_running_execution_that_a_retry_puts_back_in_the_queue(app, live_org):
    """The race, made deterministic with a row lock: the retry's UPDATE (running -> queued) is
    made and not yet committed when the cancel arrives; the cancel waits on the row, and
    PostgreSQL re-checks its WHERE on the row as the retry left it. Two statements answered 409
    here (the first saw `running`, the second `queued`) and the retry ran."""
    client = app.test_client()
    execution_id = _queued(client, live_org)
    claimed = _claim(execution_id)
    answers = []
    with db.engine.connect() as retry_conn:
        retry = retry_conn.begin()
        assert store.requeue_for_retry(
            retry_conn, claimed, attempt_status="failed", error=RETRY_ERROR, usage={}
        )
        canceller = threading.Thread(
            target=lambda: answers.append(_cancel(app.test_client(), live_org, execution_id))
        )
        canceller.start()
        try:
            wait_until(an_execution_update_waits_on_a_row_lock, timeout=10)
        finally:
            retry.commit()
        canceller.join(timeout=10)
    assert not canceller.is_alive()
    response = answers[0]
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["status"] == "cancelled"
    row = _row(execution_id)
    assert row["status"] == "cancelled" and row["finished_at"] is not None
    with db.hot() as conn:
        assert store.claim(conn, uuid.UUID(execution_id), "test-worker", 60)[0] is None
    # Attempt 1 is listed as the retry recorded it.
    attempts = client.get(f"/api/v1/executions/{execution_id}/attempts", headers=live_org.headers)
    assert [(a["attempt"], a["status"]) for a in attempts.get_json()] == [(1, "failed")]
