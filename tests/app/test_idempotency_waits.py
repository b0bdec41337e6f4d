"""What a keyed request waits for, with committed rows and no worker: its lock bound covers the
key only, and a pool with no connection free answers 503, not 500."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

from sqlalchemy import text

from app.db import db
from tests.conftest import an_execution_update_waits_on_a_row_lock, wait_until

PARKED = {
    "name": "parked",
    "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
    "queue": "idempotency-parked",
}
# Past the claim's lock_timeout (5 s), under the statement timeout (8 s).
ROW_HELD_SECONDS = 5.5


def _queued(client, org) -> str:
    created = client.post("/api/v1/agents", json=PARKED, headers=org.headers)
    assert created.status_code == 201, created.get_json()
    submitted = client.post(
        "/api/v1/agents/parked/executions", json={"input": {}}, headers=org.headers
    )
    assert submitted.status_code == 202, submitted.get_json()
    return submitted.get_json()["id"]


def test_a_keyed_request_waits_for_its_own_locks_past_the_key_bound(app, live_org):
    """The claim's `SET LOCAL lock_timeout` covered the whole request: a keyed cancel waiting
    over 5 s on the execution's row got LockNotAvailable, answered 503 'cannot be reached'."""
    client = app.test_client()
    execution_id = _queued(client, live_org)
    headers = {**live_org.headers, "Idempotency-Key": str(uuid.uuid4())}
    answers = []
    with db.engine.connect() as holder:
        holding = holder.begin()
        holder.execute(
            text("SELECT 1 FROM executions WHERE id = :id FOR UPDATE"), {"id": execution_id}
        )
        canceller = threading.Thread(
            target=lambda: answers.append(
                app.test_client().post(f"/api/v1/executions/{execution_id}/cancel", headers=headers)
            )
        )
        canceller.start()
        try:
            wait_until(an_execution_update_waits_on_a_row_lock, timeout=10)
            time.sleep(ROW_HELD_SECONDS)
        finally:
            holding.rollback()
        canceller.join(timeout=10)
    assert not canceller.is_alive()
    response = answers[0]
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["status"] == "cancelled"
    replayed = client.post(f"/api/v1/executions/{execution_id}/cancel", headers=headers)
    assert replayed.status_code == 202 and replayed.headers["Idempotency-Replayed"] == "true"


def test_no_pooled_connection_free_is_503_within_seconds(app, live_org):
    """Every connection of the pool held (a real exhaustion): the checkout times out after the
    pool timeout, and sqlalchemy's TimeoutError is an overload answer, not a 500."""
    client = app.test_client()
    pool = db.engine.pool
    # SQLAlchemy keeps max_overflow private; size + overflow is everything the pool hands out.
    capacity = pool.size() + pool._max_overflow
    with contextlib.ExitStack() as held:
        for _ in range(capacity - pool.checkedout()):
            held.enter_context(db.engine.connect())
        assert pool.checkedout() == capacity
        started = time.monotonic()
        response = client.post(
            "/api/v1/agents",
            json={**PARKED, "name": "crowded"},
            headers={**live_org.headers, "Idempotency-Key": str(uuid.uuid4())},
        )
        waited = time.monotonic() - started
    body = response.get_json()
    assert response.status_code == 503, body
    assert "too busy" in body["message"] and body["hint"], body
    assert waited < 10, waited
    # The connections given back, the same request goes through.
    again = client.post(
        "/api/v1/agents",
        json={**PARKED, "name": "crowded"},
        headers={**live_org.headers, "Idempotency-Key": str(uuid.uuid4())},
    )
    assert again.status_code == 201, again.get_json()
