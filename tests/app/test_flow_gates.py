"""Flow control decisions, in one transaction per test: which executions are let out to start,
which wait and why, and what frees a slot. (The same rules with real workers, crashes and two
processes: tests/faults/test_flow_control.py.)"""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from sqlalchemy import text

from app import runs
from app.config import current_config, use_config
from app.executions import gates, leases, store
from app.executions.versions import specs
from tests.app.test_executions_api import ECHO, make_agent, submit
from workers import settle

USAGE = {"cpu_seconds": 0.0, "max_rss_mb": 0.0, "wall_seconds": 0.0}


def limit_agent(client, org, connection, name="echo", **limits) -> dict:
    """An agent whose definition carries `concurrency` / `rate_limit`."""
    return make_agent(client, org, {**ECHO, "name": name, **limits})


def set_org(connection, org, **limits) -> None:
    for name, value in limits.items():
        connection.execute(
            text(f"UPDATE organizations SET {name} = :v WHERE id = :id"), {"v": value, "id": org.id}
        )


def row(connection, execution_id):
    return connection.execute(
        text(
            "SELECT status, waiting_for, dispatched_at, error, gated FROM executions WHERE id = :id"
        ),
        {"id": execution_id},
    ).one()


def claim(connection, execution_id):
    claimed, _ = store.claim(connection, uuid.UUID(execution_id), "test-worker", 60)
    assert claimed is not None, "let out, so a worker may claim it"
    return claimed


def end(connection, claimed, status="succeeded"):
    assert settle.ended(connection, claimed, status, None, USAGE)


def test_past_max_running_an_execution_waits_saying_why_and_starts_when_a_slot_frees(
    client, org, connection
):
    make_agent(client, org)
    set_org(connection, org, max_running=1)
    first = submit(client, org).get_json()
    second = submit(client, org).get_json()
    assert first["waiting_for"] is None and second["waiting_for"] == "org_max_running"
    assert row(connection, second["id"]).dispatched_at is None, "no message until it may start"
    read = client.get(f"/api/v1/executions/{second['id']}", headers=org.headers).get_json()
    assert read["status"] == "queued" and read["waiting_for"] == "org_max_running"
    # A held execution cannot be claimed, whatever message turns up for it.
    assert store.claim(connection, uuid.UUID(second["id"]), "w", 60)[0] is None
    end(connection, claim(connection, first["id"]))
    after = row(connection, second["id"])
    assert after.waiting_for is None and after.dispatched_at is not None
    claim(connection, second["id"])


def test_a_cancel_of_an_execution_let_out_frees_its_slot(client, org, connection):
    make_agent(client, org)
    set_org(connection, org, max_running=1)
    first = submit(client, org).get_json()
    second = submit(client, org).get_json()
    cancelled = client.post(f"/api/v1/executions/{first['id']}/cancel", headers=org.headers)
    assert cancelled.status_code == 202
    assert row(connection, second["id"]).waiting_for is None


def test_concurrency_per_key_lets_other_keys_run(client, org, connection):
    limit_agent(client, org, connection, concurrency={"limit": 1, "key": "$.input.text"})
    a1 = submit(client, org, {"text": "a"}).get_json()
    a2 = submit(client, org, {"text": "a"}).get_json()
    b1 = submit(client, org, {"text": "b"}).get_json()
    assert [a1["waiting_for"], a2["waiting_for"], b1["waiting_for"]] == [
        None,
        "agent_concurrency",
        None,
    ]
    # A retry keeps its slot; a failure frees it.
    end(connection, claim(connection, a1["id"]), status="failed")
    assert row(connection, a2["id"]).waiting_for is None


def test_without_a_key_the_agent_is_one_group_and_keys_take_turns(client, org, connection):
    limit_agent(client, org, connection, concurrency={"limit": 2})
    ids = [submit(client, org, {"text": str(n)}).get_json() for n in range(4)]
    assert [body["waiting_for"] for body in ids] == [
        None,
        None,
        "agent_concurrency",
        "agent_concurrency",
    ]


def test_on_limit_reject_answers_409_and_stores_nothing(client, org, connection):
    agent = limit_agent(
        client,
        org,
        connection,
        concurrency={"limit": 1, "key": "$.input.text", "on_limit": "reject"},
    )
    assert submit(client, org, {"text": "a"}).status_code == 202
    refused = submit(client, org, {"text": "a"})
    assert refused.status_code == 409, refused.get_json()
    assert "on_limit is reject" in refused.get_json()["message"]
    assert submit(client, org, {"text": "b"}).status_code == 202, "another key has room"
    count = connection.execute(
        text("SELECT count(*) FROM executions WHERE agent_id = :id"), {"id": agent["id"]}
    ).scalar()
    assert count == 2


def test_on_limit_cancel_running_supersedes_the_older_executions_of_the_key(
    client, org, connection
):
    limit_agent(
        client,
        org,
        connection,
        concurrency={"limit": 1, "key": "$.input.text", "on_limit": "cancel_running"},
    )
    running = submit(client, org, {"text": "a"}).get_json()
    claimed = claim(connection, running["id"])
    waiting = submit(client, org, {"text": "a"}).get_json()
    newest = submit(client, org, {"text": "a"}).get_json()
    # The waiting one ended at once; the running one was asked to stop and holds its slot.
    ended = row(connection, waiting["id"])
    assert ended.status == "cancelled" and ended.error["type"] == "superseded"
    assert newest["id"] in ended.error["message"]
    assert row(connection, running["id"]).status == "running"
    assert newest["waiting_for"] == "agent_concurrency"
    # Its worker records the cancel; the error says why, and the newest starts.
    assert store.finish(
        connection,
        claimed,
        status="cancelled",
        output=None,
        error={"type": "cancelled", "message": "stopped", "hint": ""},
        usage=USAGE,
    )
    gates.released_in_transaction(connection, org.id)
    stopped = row(connection, running["id"])
    assert stopped.status == "cancelled" and stopped.error["type"] == "superseded"
    assert row(connection, newest["id"]).waiting_for is None


def test_a_rate_limit_lets_out_limit_per_period_and_counts_those_not_started(
    client, org, connection
):
    limit_agent(client, org, connection, rate_limit={"limit": 2, "period_seconds": 60})
    bodies = [submit(client, org).get_json() for _ in range(3)]
    assert [body["waiting_for"] for body in bodies] == [None, None, "agent_rate_limit"]
    end(connection, claim(connection, bodies[0]["id"]))
    # Its start is still within the period: the third waits on.
    assert row(connection, bodies[2]["id"]).waiting_for == "agent_rate_limit"


def test_a_batch_past_a_limit_lets_out_what_fits(client, org, connection):
    limit_agent(client, org, connection, concurrency={"limit": 3})
    response = client.post(
        "/api/v1/agents/echo/executions/batch",
        json={"items": [{"input": {"text": str(n)}} for n in range(5)]},
        headers=org.headers,
    )
    assert response.status_code == 202, response.get_json()
    waits = [
        row(connection, execution_id).waiting_for for execution_id in response.get_json()["ids"]
    ]
    assert waits == [None, None, None, "agent_concurrency", "agent_concurrency"]


@pytest.fixture
def fair_window():
    saved = current_config()
    use_config(dataclasses.replace(saved, fair_window=3))
    yield 3
    use_config(saved)


def test_past_its_fair_window_an_organization_waits_in_postgresql_and_claims_let_it_out(
    client, org, other_org, connection, fair_window
):
    make_agent(client, org)
    make_agent(client, other_org)
    response = client.post(
        "/api/v1/agents/echo/executions/batch",
        json={"items": [{"input": {"text": str(n)}} for n in range(5)]},
        headers=org.headers,
    )
    ids = response.get_json()["ids"]
    held = [row(connection, execution_id) for execution_id in ids]
    assert [r.waiting_for for r in held] == [None, None, None, "queue", "queue"]
    assert all(r.dispatched_at is None for r in held[3:])
    # The API shows no limit: it only waits for its turn.
    read = client.get(f"/api/v1/executions/{ids[3]}", headers=org.headers).get_json()
    assert read["waiting_for"] is None and read["status"] == "queued"
    # Another organization's window is its own.
    assert submit(client, other_org).get_json()["waiting_for"] is None
    other = submit(client, other_org).get_json()
    assert row(connection, other["id"]).waiting_for is None
    # Claims make room: once half the window is claimed, the ones held back go out to fill it,
    # in order.
    claimed, let_out = store.claim(connection, uuid.UUID(ids[0]), "w", 60, fair_window)
    assert claimed is not None and let_out == [], "two of three still unclaimed"
    claimed, let_out = store.claim(connection, uuid.UUID(ids[1]), "w", 60, fair_window)
    assert claimed is not None
    assert [str(out.execution_id) for out in let_out] == [ids[3], ids[4]]
    assert row(connection, ids[3]).waiting_for is None
    assert row(connection, ids[4]).waiting_for is None


def test_the_flow_tick_tops_up_a_window_with_room(client, org, connection, fair_window):
    make_agent(client, org)
    ids = [submit(client, org).get_json()["id"] for _ in range(5)]
    assert row(connection, ids[4]).waiting_for == "queue"
    # Cancelled without a claim: nothing made room for the held ones.
    for execution_id in ids[:2]:
        client.post(f"/api/v1/executions/{execution_id}/cancel", headers=org.headers)
    assert gates.flow_tick() >= 2
    assert row(connection, ids[3]).waiting_for is None
    assert row(connection, ids[4]).waiting_for is None


def test_with_the_fair_window_off_nothing_waits(client, org, connection):
    saved = current_config()
    use_config(dataclasses.replace(saved, fair_window=0))
    try:
        make_agent(client, org)
        bodies = [submit(client, org).get_json() for _ in range(40)]
    finally:
        use_config(saved)
    assert all(row(connection, body["id"]).waiting_for is None for body in bodies)


def test_a_new_execution_waits_behind_those_held_back_even_with_room_in_the_window(
    client, org, connection, fair_window
):
    make_agent(client, org)
    ids = [submit(client, org).get_json()["id"] for _ in range(5)]
    store.claim(connection, uuid.UUID(ids[0]), "w", 60, fair_window)
    # Two unclaimed of three: room for one, but two older ones are held back.
    newest = submit(client, org, {"text": "late"}).get_json()
    assert row(connection, newest["id"]).waiting_for == "queue"


def test_a_lost_attempt_of_a_rate_limited_agent_waits_for_the_window(client, org, connection):
    limit_agent(
        client,
        org,
        connection,
        rate_limit={"limit": 1, "period_seconds": 60},
        retry={"max_retries": 1, "retry_on": ["lost"]},
    )
    execution = submit(client, org).get_json()
    claim(connection, execution["id"])
    connection.execute(
        text("UPDATE executions SET lease_until = now() - interval '1 second' WHERE id = :id"),
        {"id": execution["id"]},
    )
    requeued = leases.requeue_expired(connection)
    assert [(str(r.id), r.waiting_for) for r in requeued] == [
        (execution["id"], "agent_rate_limit")
    ], "held for the gates, not published: its first start is in the window"
    gates.released_in_transaction(connection, org.id)
    assert row(connection, execution["id"]).waiting_for == "agent_rate_limit"


def test_cancel_running_in_one_launch_lets_the_newest_of_a_key_win(client, org, connection):
    limit_agent(
        client,
        org,
        connection,
        concurrency={"limit": 1, "key": "$.input.text", "on_limit": "cancel_running"},
    )
    version_id = connection.execute(
        text("SELECT current_version_id FROM agents WHERE org_id = :org"), {"org": org.id}
    ).scalar()
    spec = specs.get(connection, version_id)
    older, newer = uuid.uuid4(), uuid.uuid4()
    runs.launch(
        connection,
        [
            runs.Launch(older, org.id, spec, {"text": "a"}),
            runs.Launch(newer, org.id, spec, {"text": "a"}),
        ],
    )
    assert row(connection, older).error["type"] == "superseded"
    assert row(connection, newer).status == "queued" and row(connection, newer).waiting_for is None
