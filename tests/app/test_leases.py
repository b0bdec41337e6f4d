"""The sweeper's two lease statements split the expired attempts between them: the requeue takes
those whose agent retries `lost`, the end takes the rest, whichever runs first."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from app.executions import leases, store
from tests.app.test_executions_api import ECHO, make_agent, submit


def running_with_an_expired_lease(client, org, connection, name: str, retry: dict) -> str:
    make_agent(client, org, {**ECHO, "name": name, "retry": retry})
    execution_id = submit(client, org, agent=name).get_json()["id"]
    claimed, _ = store.claim(connection, uuid.UUID(execution_id), "test-worker", 60)
    assert claimed is not None
    connection.execute(
        text("UPDATE executions SET lease_until = now() - interval '1 second' WHERE id = :id"),
        {"id": execution_id},
    )
    return execution_id


def status_and_error(connection, execution_id: str) -> tuple[str, str | None]:
    return connection.execute(
        text("SELECT status, error ->> 'message' FROM executions WHERE id = :id"),
        {"id": execution_id},
    ).one()


def test_the_end_leaves_a_retryable_expired_attempt_to_the_requeue(client, org, connection):
    """A lease that runs out between the sweeper's requeue and its end is the next requeue's:
    the end alone never fails an attempt its agent would retry."""
    retried = running_with_an_expired_lease(
        client, org, connection, "retried", {"max_retries": 2, "retry_on": ["lost"]}
    )
    not_retried = running_with_an_expired_lease(
        client, org, connection, "not-retried", {"max_retries": 2, "retry_on": ["timeout"]}
    )
    mine = {retried, not_retried}
    ended = {str(row.id) for row in leases.fail_expired(connection)}
    assert ended & mine == {not_retried}
    assert status_and_error(connection, not_retried) == (
        "failed",
        "the worker's lease expired, and the agent's retry policy does not list `lost`",
    )
    assert status_and_error(connection, retried)[0] == "running"
    requeued = {str(row.id) for row in leases.requeue_expired(connection)}
    assert requeued & mine == {retried}
    assert status_and_error(connection, retried)[0] == "queued"


def test_the_last_attempt_and_a_cancelled_one_are_ended_not_requeued(client, org, connection):
    last = running_with_an_expired_lease(
        client, org, connection, "last", {"max_retries": 0, "retry_on": ["lost"]}
    )
    cancelled = running_with_an_expired_lease(
        client, org, connection, "cancelled", {"max_retries": 2, "retry_on": ["lost"]}
    )
    connection.execute(
        text("UPDATE executions SET cancel_requested_at = now() WHERE id = :id"),
        {"id": cancelled},
    )
    mine = {last, cancelled}
    assert not {str(row.id) for row in leases.requeue_expired(connection)} & mine
    assert {str(row.id) for row in leases.fail_expired(connection)} & mine == mine
    assert status_and_error(connection, last) == (
        "failed",
        "the worker's lease expired on the last attempt",
    )
    assert status_and_error(connection, cancelled) == (
        "cancelled",
        "cancelled while its worker was lost",
    )
