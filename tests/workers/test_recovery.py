"""Claim and fencing rules, and the sweeper's recovery of work the broker never delivered."""

import contextlib
import uuid

import pytest
from sqlalchemy import text

from app.broker import DATABASE_AWAY_KEY, BrokerWatch
from app.config import current_config
from app.db import DATABASE_ERRORS, db
from app.embedded import free_port
from app.executions import dispatch, recovery, store
from app.executions.versions import specs
from tests.conftest import wait_for, wait_until


def force(execution_id, assignments: str) -> None:
    """Put a row in the state a failure would have left it in."""
    with db.hot() as conn:
        conn.execute(
            text(f"UPDATE executions SET {assignments} WHERE id = :id"), {"id": execution_id}
        )


def _execution(client, org, name="echo"):
    client.post(
        "/api/v1/agents",
        json={
            "name": name,
            "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
            "retry": {"max_retries": 1},
        },
        headers=org.headers,
    )
    return uuid.UUID(
        client.post(
            f"/api/v1/agents/{name}/executions", json={"input": {}}, headers=org.headers
        ).get_json()["id"]
    )


def test_claim_is_taken_once_and_stale_attempts_are_fenced(client, org, connection):
    execution_id = _execution(client, org)
    first = store.claim(connection, execution_id, "worker-a", 60)[0]
    assert first is not None and first.attempt == 1
    assert store.claim(connection, execution_id, "worker-b", 60)[0] is None, "a duplicate message"
    # The sweeper gives the execution back (lease expired) and a second worker takes it.
    connection.execute(
        text("UPDATE executions SET lease_until = now() - interval '1 second' WHERE id = :id"),
        {"id": execution_id},
    )
    connection.execute(
        text("UPDATE executions SET status = 'queued' WHERE id = :id"), {"id": execution_id}
    )
    second = store.claim(connection, execution_id, "worker-b", 60)[0]
    assert second.attempt == 2
    usage = {"cpu_seconds": 0, "max_rss_mb": 0, "wall_ms": 0}
    assert not store.finish(
        connection, first, status="succeeded", output={"stale": True}, error=None, usage=usage
    )
    assert store.finish(
        connection, second, status="succeeded", output={"fresh": True}, error=None, usage=usage
    )
    assert not store.finish(
        connection, second, status="failed", output=None, error=None, usage=usage
    ), "terminal states never change"
    row = connection.execute(
        text("SELECT status, output, worker FROM executions WHERE id = :id"), {"id": execution_id}
    ).one()
    assert (row.status, row.output, row.worker) == ("succeeded", {"fresh": True}, "worker-b")


@pytest.mark.worker
def test_duplicate_messages_run_once(live_client, live_org):
    execution_id = _execution(live_client, live_org)
    with db.hot() as conn:
        spec = specs.get(
            conn,
            conn.execute(
                text("SELECT version_id FROM executions WHERE id = :id"), {"id": execution_id}
            ).scalar(),
        )
    for _ in range(3):
        dispatch.publish(execution_id, spec, 5)
    result = wait_for(live_client, live_org, str(execution_id))
    assert result["status"] == "succeeded" and result["attempts"] == 1, (
        result["error"],
        result["attempts"],
    )


@pytest.mark.worker
def test_sweeper_republishes_what_was_never_published(live_client, live_org):
    live_client.post(
        "/api/v1/agents",
        json={"name": "echo", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}},
        headers=live_org.headers,
    )
    agent = live_client.get("/api/v1/agents/echo", headers=live_org.headers).get_json()
    execution_id = uuid.uuid4()
    with db.hot() as conn:
        # As if the API committed the row and died before publishing.
        conn.execute(
            text(
                "INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, "
                "agent_version, status, input, queued_at) "
                "SELECT :id, a.org_id, a.id, a.current_version_id, a.name, a.current_version, "
                "'queued', '{\"lost\": true}', now() - interval '5 minutes' "
                "FROM agents a WHERE a.id = :agent"
            ),
            {"id": execution_id, "agent": agent["id"]},
        )
    report = recovery.sweep()
    assert report.republished >= 1
    result = wait_for(live_client, live_org, str(execution_id))
    assert result["status"] == "succeeded" and result["output"]["echo"] == {"lost": True}


@pytest.mark.worker
def test_sweeper_requeues_an_expired_lease_then_fails_it_as_lost(live_client, live_org):
    execution_id = _execution(live_client, live_org)
    wait_for(live_client, live_org, str(execution_id))
    # As if the worker running attempt 1 died: running, lease expired, one retry left.
    force(
        execution_id,
        "status = 'running', attempt = 1, output = NULL, lease_until = now() - interval '1 second',"
        " queued_at = queued_at - interval '5 minutes'",
    )
    report = recovery.sweep()
    assert report.requeued >= 1 and report.republished >= 1
    result = wait_for(live_client, live_org, str(execution_id))
    assert result["status"] == "succeeded" and result["attempts"] == 2
    force(execution_id, "status = 'running', lease_until = now() - interval '1 second'")
    assert recovery.sweep().lost >= 1
    result = live_client.get(
        f"/api/v1/executions/{execution_id}", headers=live_org.headers
    ).get_json()
    assert result["status"] == "failed" and result["error"]["type"] == "lost"
    attempts = live_client.get(
        f"/api/v1/executions/{execution_id}/attempts", headers=live_org.headers
    ).get_json()
    # Attempt 1 was taken back from its lost worker; attempt 2 is the final, lost one.
    assert [(a["attempt"], a["status"]) for a in attempts] == [(1, "failed"), (2, "failed")]
    assert all(a["error"]["type"] == "lost" and a["worker"] for a in attempts)


@pytest.mark.worker
def test_submits_are_published_in_the_background_and_stamped(live_client, live_org):
    live_client.post(
        "/api/v1/agents",
        json={"name": "echo", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}},
        headers=live_org.headers,
    )
    ids = [
        live_client.post(
            "/api/v1/agents/echo/executions", json={"input": {"n": n}}, headers=live_org.headers
        ).get_json()["id"]
        for n in range(20)
    ]
    for execution_id in ids:
        assert wait_for(live_client, live_org, execution_id)["status"] == "succeeded"

    def all_stamped():
        with db.hot() as conn:
            return conn.execute(
                text(
                    "SELECT count(*) FROM executions WHERE id = ANY(:ids) "
                    "AND dispatched_at IS NOT NULL"
                ),
                {"ids": [uuid.UUID(i) for i in ids]},
            ).scalar() == len(ids)

    wait_until(all_stamped, timeout=5)


@pytest.mark.worker
def test_dispatcher_drains_what_is_waiting_at_exit(live_client, live_org):
    execution_id = _execution(live_client, live_org, name="drained")
    wait_for(live_client, live_org, str(execution_id))
    # As if committed and queued in memory when the process began to exit.
    force(execution_id, "status = 'queued', attempt = 0, dispatched_at = NULL")
    with db.hot() as conn:
        version_id = conn.execute(
            text("SELECT version_id FROM executions WHERE id = :id"), {"id": execution_id}
        ).scalar()
        spec = specs.get(conn, version_id)
    dispatcher = dispatch.Dispatcher()
    dispatcher._pending.append(dispatch.Dispatch(execution_id, spec, 5))
    dispatcher.drain()
    result = wait_for(live_client, live_org, str(execution_id))
    assert result["status"] == "succeeded" and result["attempts"] == 1


@pytest.mark.worker
def test_sweeper_does_not_rerun_lost_work_unless_the_policy_allows(live_client, live_org):
    live_client.post(
        "/api/v1/agents",
        json={
            "name": "once",
            "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
            "retry": {"max_retries": 3, "retry_on": ["runtime_error"]},
        },
        headers=live_org.headers,
    )
    execution_id = live_client.post(
        "/api/v1/agents/once/executions", json={"input": {}}, headers=live_org.headers
    ).get_json()["id"]
    wait_for(live_client, live_org, execution_id)
    force(
        execution_id, "status = 'running', attempt = 1, lease_until = now() - interval '1 second'"
    )
    report = recovery.sweep()
    assert report.requeued == 0 and report.lost >= 1
    result = live_client.get(
        f"/api/v1/executions/{execution_id}", headers=live_org.headers
    ).get_json()
    assert result["status"] == "failed" and result["error"]["type"] == "lost"


@contextlib.contextmanager
def database_unreachable():
    """This process's database is a port nobody listens on, until the block ends."""
    url = current_config().require_database()
    db.configure(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone")
    try:
        yield
    finally:
        db.configure(url)


@pytest.fixture
def expired_running(live_client, live_org):
    """An execution left `running` by its worker, its lease run out a minute ago; the sweeper's
    memory of outages is cleared whatever the test does (it would hold back later sweeps)."""
    execution_id = _execution(live_client, live_org)
    wait_for(live_client, live_org, str(execution_id))
    force(
        execution_id,
        "status = 'running', attempt = 1, output = NULL, lease_until = now() - interval '1 minute'",
    )
    yield execution_id
    recovery.outages.forget(watch())


def watch() -> BrokerWatch:
    """The sweepers' watch: its Redis is the broker's, or REDIS_URL's on RabbitMQ."""
    cfg = current_config()
    return BrokerWatch.for_broker(cfg.broker_url, cfg.redis_url)


def lease_left(execution_id) -> float:
    with db.hot() as conn:
        return conn.execute(
            text("SELECT extract(epoch FROM lease_until - now()) FROM executions WHERE id = :id"),
            {"id": execution_id},
        ).scalar()


@pytest.mark.worker
def test_the_sweep_after_the_database_was_away_extends_running_leases_and_expires_none(
    live_client, live_org, expired_running
):
    broker = watch().client
    with database_unreachable(), pytest.raises(DATABASE_ERRORS):
        recovery.sweep()
    assert broker.get(DATABASE_AWAY_KEY), "every beat's next sweep knows of the outage"
    report = recovery.sweep()
    assert report.leases_extended >= 1 and report.requeued == 0 and report.lost == 0, report
    assert lease_left(expired_running) > current_config().lease_seconds - 5
    assert broker.get(DATABASE_AWAY_KEY) is None
    # One extension per outage: a lease that runs out again (its worker is gone) is taken back.
    force(expired_running, "lease_until = now() - interval '1 second'")
    report = recovery.sweep()
    assert report.requeued >= 1 and report.leases_extended == 0, report
    result = wait_for(live_client, live_org, str(expired_running))
    assert result["status"] == "succeeded" and result["attempts"] == 2


@pytest.mark.worker
def test_an_outage_is_remembered_in_the_process_when_the_broker_forgot_it(expired_running):
    broker = watch().client
    with database_unreachable(), pytest.raises(DATABASE_ERRORS):
        recovery.sweep()
    broker.delete(DATABASE_AWAY_KEY)  # as a flushed (or unreachable) broker would
    report = recovery.sweep()
    assert report.leases_extended >= 1 and report.requeued == 0 and report.lost == 0, report
