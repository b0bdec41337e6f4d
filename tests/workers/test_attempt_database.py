"""An attempt's log flushes and cancel checks while PostgreSQL is away: best effort, nothing
lost, and no statement after the failure on the connection PostgreSQL dropped."""

import time
import uuid

import pytest
from sqlalchemy import text

from app.db import db
from app.executions.spec import LEVELS
from workers.attempt import FIRST_PAUSE_SECONDS, AttemptDatabase
from workers.logbuffer import LogBuffer
from workers.runner import CancelCheck

pytestmark = pytest.mark.worker

# Above any line the execution itself logged.
LAST_SEQ = 1000


@pytest.fixture
def execution_id(live_client, live_org) -> uuid.UUID:
    """A committed execution at attempt 1 (the log insert is fenced by the attempt)."""
    live_client.post(
        "/api/v1/agents",
        json={"name": "echo", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}},
        headers=live_org.headers,
    )
    created = live_client.post(
        "/api/v1/agents/echo/executions", json={"input": {}}, headers=live_org.headers
    ).get_json()
    execution_id = uuid.UUID(created["id"])
    deadline = time.monotonic() + 30
    while logged(execution_id, "SELECT attempt FROM executions WHERE id = :id") != [(1,)]:
        assert time.monotonic() < deadline, "the execution was never claimed"
        time.sleep(0.05)
    return execution_id


def logged(execution_id: uuid.UUID, query: str) -> list[tuple]:
    with db.hot() as conn:
        return [tuple(row) for row in conn.execute(text(query), {"id": execution_id})]


def kill_backend(conn) -> None:
    """What a PostgreSQL restart does to a connection, for this one alone."""
    pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    with db.hot() as other:
        assert other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()


def test_log_lines_wait_out_a_dead_connection_and_go_on_a_fresh_one(execution_id):
    with db.hot() as claimed_on:
        database = AttemptDatabase(claimed_on)
        buffer = LogBuffer(
            database,
            execution_id,
            1,
            LAST_SEQ,
            batch_lines=2,
            flush_seconds=60,
            max_chars=1000,
            max_lines=100,
        )
        kill_backend(claimed_on)
        buffer.add(LEVELS["info"], "one")
        buffer.add(LEVELS["info"], "two")  # a full batch: the flush fails and must not raise
        buffer.add(LEVELS["info"], "three")  # in the pause after the failure: not even tried
        query = (
            f"SELECT seq, message FROM execution_logs WHERE execution_id = :id AND seq > {LAST_SEQ}"
        )
        assert logged(execution_id, query) == []
        time.sleep(FIRST_PAUSE_SECONDS)
        buffer.close()
        with database.connection() as conn:
            assert conn is not claimed_on, "the dead connection is not used again"
    assert logged(execution_id, query + " ORDER BY seq") == [
        (LAST_SEQ + 1, "one"),
        (LAST_SEQ + 2, "two"),
        (LAST_SEQ + 3, "three"),
    ]


def test_a_cancel_check_the_database_cannot_answer_is_not_a_cancel(execution_id, caplog):
    with db.hot() as conn:
        conn.execute(
            text("UPDATE executions SET cancel_requested_at = now() WHERE id = :id"),
            {"id": execution_id},
        )
    with db.hot() as claimed_on:
        database = AttemptDatabase(claimed_on)
        check = CancelCheck(database, execution_id)
        kill_backend(claimed_on)
        assert check() is False
        assert check() is False, "in the pause after the failure"
        time.sleep(FIRST_PAUSE_SECONDS)
        assert check() is True, "the cancel is seen once the database answers"
    warnings = [r for r in caplog.records if "cannot say whether a cancel" in r.getMessage()]
    assert len(warnings) == 1
