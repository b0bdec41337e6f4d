"""Schedules fired by real beat processes (workers/scheduler.py), served by a real worker.

Agents on the queue `idle`, which no worker serves, keep their executions queued: that is how
these tests hold a "previous fire still running" without waiting on slow agents.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections import Counter

import pytest
from sqlalchemy import text

from tests.beat import Beats
from tests.conftest import wait_for, wait_until

pytestmark = pytest.mark.worker

EVERY_SECOND = "* * * * * *"


@pytest.fixture
def beats(tmp_path):
    started = Beats(tmp_path)
    yield started
    started.stop_all()


def define(client, org, name, function="echo", queue="default"):
    body = {
        "name": name,
        "runtime": {"type": "python", "entrypoint": f"tests.agents:{function}"},
        "queue": queue,
    }
    response = client.post("/api/v1/agents", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()


def schedule(client, org, name, agent, **fields):
    body = {"name": name, "target": {"agent": agent}, "cron": EVERY_SECOND, **fields}
    response = client.post("/api/v1/schedules", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def history(client, org, schedule_id):
    entries, page = [], 1
    while True:
        response = client.get(
            f"/api/v1/schedules/{schedule_id}/history?page={page}&page_size=100",
            headers=org.headers,
        )
        assert response.status_code == 200
        entries.extend(response.get_json())
        if len(response.get_json()) < 100:
            return entries
        page += 1


def read(client, org, schedule_id):
    return client.get(f"/api/v1/schedules/{schedule_id}", headers=org.headers).get_json()


def at(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_creates_edits_pauses_and_deletes_take_effect_within_a_second(live_client, live_org, beats):
    client, org = live_client, live_org
    beats.start()
    define(client, org, "echo")
    created_at = now()
    created = schedule(client, org, "tick", "echo", input={"n": 1}, overlap="allow")
    first = wait_until(lambda: history(client, org, created["id"]), timeout=5)[-1]
    assert first["status"] == "fired" and first["kind"] == "scheduled"
    assert at(first["fire_time"]) - created_at <= dt.timedelta(seconds=1)
    # Fired on time: recorded within a fraction of a second of its fire time.
    assert at(first["fired_at"]) - at(first["fire_time"]) < dt.timedelta(seconds=1)
    result = wait_for(client, org, first["execution_id"])
    assert result["status"] == "succeeded" and result["output"]["echo"] == {"n": 1}

    edited_at = now()
    response = client.patch(
        f"/api/v1/schedules/{created['id']}",
        json={"cron": "0 0 1 1 *", "input": {"n": 2}},
        headers=org.headers,
    )
    assert response.status_code == 200
    time.sleep(1.5)
    late = [e for e in history(client, org, created["id"]) if at(e["fire_time"]) > edited_at]
    assert all(at(e["fire_time"]) - edited_at < dt.timedelta(seconds=1) for e in late)

    client.patch(
        f"/api/v1/schedules/{created['id']}", json={"cron": EVERY_SECOND}, headers=org.headers
    )
    wait_until(
        lambda: any(
            e["execution_id"]
            and client.get(
                f"/api/v1/executions/{e['execution_id']}", headers=org.headers
            ).get_json()["input"]
            == {"n": 2}
            for e in history(client, org, created["id"])[:3]
        ),
        timeout=5,
    )

    client.post(f"/api/v1/schedules/{created['id']}/pause", headers=org.headers)
    paused_at = now()
    time.sleep(1.5)
    after_pause = [e for e in history(client, org, created["id"]) if at(e["fire_time"]) > paused_at]
    assert all(at(e["fire_time"]) - paused_at < dt.timedelta(seconds=1) for e in after_pause)

    resumed_at = now()
    client.post(f"/api/v1/schedules/{created['id']}/resume", headers=org.headers)
    wait_until(
        lambda: any(at(e["fire_time"]) > resumed_at for e in history(client, org, created["id"])),
        timeout=3,
    )

    assert (
        client.delete(f"/api/v1/schedules/{created['id']}", headers=org.headers).status_code == 204
    )
    deleted_at = now()
    time.sleep(1.5)
    executions = client.get(
        "/api/v1/executions?agent=echo&page_size=100", headers=org.headers
    ).get_json()
    assert all(at(e["queued_at"]) - deleted_at < dt.timedelta(seconds=1) for e in executions)


# Fires per schedule in the two-beats test: 12 seconds of five every-second schedules.
FIRES = 12
# The beats' fair window there: the 60 fires are well past two windows.
TWO_BEATS_WINDOW = 8


def test_two_schedulers_fire_each_time_exactly_once(live_client, live_org, beats, connection_free):
    client, org = live_client, live_org
    pair = beats.start(2, env={"RUNYARD_FAIR_WINDOW": str(TWO_BEATS_WINDOW)})
    define(client, org, "idler", queue="idle")
    ids = [
        schedule(client, org, f"s{i}", "idler", overlap="allow", catchup="all")["id"]
        for i in range(5)
    ]
    deadline = time.monotonic() + 30
    while min(len(history(client, org, sid)) for sid in ids) < FIRES:
        assert time.monotonic() < deadline, f"fewer than {FIRES} fires in 30 s"
        time.sleep(0.5)
    for sid in ids:
        client.post(f"/api/v1/schedules/{sid}/pause", headers=org.headers)
    time.sleep(0.5)
    assert all(beat.alive() for beat in pair), [beat.log() for beat in pair]

    rows = connection_free(
        """
        SELECT f.schedule_id, f.fire_time, f.status, f.execution_id, f.fired_by,
               e.id AS found, e.dispatched_at, e.waiting_for
        FROM schedule_fires f LEFT JOIN executions e ON e.id = f.execution_id
        WHERE f.org_id = :org ORDER BY f.schedule_id, f.fire_time
        """,
        org=org.id,
    )
    fired_by = Counter(row.fired_by for row in rows)
    print("fires per beat:", dict(fired_by))
    for sid in ids:
        mine = [row for row in rows if str(row.schedule_id) == sid]
        times = [row.fire_time for row in mine]
        assert len(times) >= FIRES
        # One record per second, none missing, none twice.
        assert len(set(times)) == len(times)
        assert all(b - a == dt.timedelta(seconds=1) for a, b in itertools.pairwise(times))
        # Published, or (no worker serves `idle`) held back past the organization's fair window.
        assert all(
            row.status == "fired"
            and row.found
            and (row.dispatched_at or row.waiting_for == "queue")
            for row in mine
        )
    # Each beat's insert counts the unclaimed messages it sees: all of its own, and the other
    # beat's committed ones. So each beat keeps the organization within one window by its own
    # count, and the two within two windows (their inserts at the same moment do not see each
    # other's).
    published = sum(1 for row in rows if row.dispatched_at)
    assert published <= 2 * TWO_BEATS_WINDOW, "the fair window holds the rest back"
    executions = connection_free(
        "SELECT count(*) AS n FROM executions WHERE org_id = :org", org=org.id
    )[0].n
    assert executions == len(rows)


def test_overlap_policies(live_client, live_org, beats):
    client, org = live_client, live_org
    beats.start()
    define(client, org, "idler", queue="idle")
    ids = {
        policy: schedule(client, org, policy.replace("_", "-"), "idler", overlap=policy)["id"]
        for policy in ("skip", "allow", "buffer_one", "cancel_other")
    }
    wait_until(lambda: all(len(history(client, org, sid)) >= 4 for sid in ids.values()), timeout=10)
    entries = {policy: history(client, org, sid)[::-1] for policy, sid in ids.items()}

    allow = entries["allow"]
    assert all(e["status"] == "fired" and e["execution_status"] == "queued" for e in allow)

    skip = entries["skip"]
    assert skip[0]["status"] == "fired"
    for entry in skip[1:4]:
        assert entry["status"] == "skipped" and entry["execution_id"] is None
        assert entry["skipped_reason"] == (
            f"overlap skip: execution {skip[0]['execution_id']} is still queued"
        )

    buffer_one = entries["buffer_one"]
    assert [e["status"] for e in buffer_one[:4]] == ["fired", "buffered", "skipped", "skipped"]
    assert "one fire already waits" in buffer_one[2]["skipped_reason"]

    cancel_other = entries["cancel_other"]
    assert all(e["status"] == "fired" for e in cancel_other)
    older = [e["execution_id"] for e in cancel_other[:-1]]
    for execution_id in older[:3]:
        execution = client.get(f"/api/v1/executions/{execution_id}", headers=org.headers)
        body = execution.get_json()
        assert body["status"] == "cancelled", body
        assert "cancel_other" in body["error"]["message"]

    # The buffered fire runs once the execution it waited for has finished.
    blocking = buffer_one[0]["execution_id"]
    assert (
        client.post(f"/api/v1/executions/{blocking}/cancel", headers=org.headers).status_code == 202
    )
    buffered_time = buffer_one[1]["fire_time"]

    def released():
        for entry in history(client, org, ids["buffer_one"]):
            if entry["fire_time"] == buffered_time and entry["status"] == "fired":
                return entry
        return None

    entry = wait_until(released, timeout=3)
    assert entry["execution_id"] and entry["execution_id"] != blocking
    for sid in ids.values():
        client.post(f"/api/v1/schedules/{sid}/pause", headers=org.headers)


def test_catchup_after_downtime(live_client, live_org, beats, connection_free):
    """Beat was down for two minutes: each policy decides what runs of the missed times."""
    client, org = live_client, live_org
    define(client, org, "idler", queue="idle")
    ids = {
        policy: schedule(
            client,
            org,
            f"catchup-{policy}",
            "idler",
            cron="*/10 * * * * *",
            overlap="allow",
            catchup=policy,
            catchup_window_seconds=35,
            enabled=False,
        )["id"]
        for policy in ("none", "latest", "all")
    }
    # Simulated downtime: the schedules were last due two minutes ago.
    stamp = now().replace(microsecond=0)
    down_since = stamp - dt.timedelta(seconds=120 + stamp.second % 10)
    connection_free(
        "UPDATE schedules SET enabled = true, next_fire_at = :since WHERE org_id = :org",
        org=org.id,
        since=down_since,
        fetch=False,
    )
    beats.start()
    wait_until(
        lambda: all(
            at(read(client, org, sid)["next_fire_at"]) > down_since + dt.timedelta(seconds=100)
            for sid in ids.values()
        ),
        timeout=10,
    )
    for sid in ids.values():
        client.post(f"/api/v1/schedules/{sid}/pause", headers=org.headers)

    def first_tick(policy):
        entries = history(client, org, ids[policy])
        tick_at = min(e["fired_at"] for e in entries)
        return [e for e in entries if e["fired_at"] == tick_at][::-1]

    grace = dt.timedelta(seconds=5)
    for policy in ("none", "latest", "all"):
        tick = first_tick(policy)
        fired = [e for e in tick if e["status"] == "fired"]
        on_time = [e for e in fired if e["kind"] == "scheduled"]
        caught_up = [e for e in fired if e["kind"] == "catchup"]
        tick_time = at(tick[0]["fired_at"])
        assert all(tick_time - at(e["fire_time"]) <= grace for e in on_time)
        assert at(tick[0]["fire_time"]) == down_since and tick[0]["status"] == "skipped"
        if policy == "none":
            assert caught_up == []
            assert "catchup none" in tick[0]["skipped_reason"]
        elif policy == "latest":
            assert len(caught_up) == (0 if on_time else 1)
            assert any("catchup latest" in (e["skipped_reason"] or "") for e in tick)
        else:
            assert "before the catch-up window (35 s)" in tick[0]["skipped_reason"]
            # Every 10 s inside the window (35 s back, minus the 5 s of grace): three times.
            assert len(caught_up) == 3
            assert all(
                tick_time - at(e["fire_time"]) <= dt.timedelta(seconds=36) for e in caught_up
            )


def test_pause_after_failures(live_client, live_org, beats):
    client, org = live_client, live_org
    beats.start()
    define(client, org, "boom", function="boom")
    define(client, org, "doomed", queue="idle")
    failing = schedule(client, org, "failing", "boom", pause_after_failures=2)
    archived = schedule(client, org, "archived", "doomed", pause_after_failures=3)
    assert client.delete("/api/v1/agents/doomed", headers=org.headers).status_code == 204

    paused = wait_until(
        lambda: (body := read(client, org, failing["id"]))["enabled"] is False and body,
        timeout=15,
    )
    assert paused["paused_reason"] == "paused itself after 2 failed fires in a row"
    assert paused["next_fire_at"] is None and paused["consecutive_failures"] == 2
    statuses = [e["execution_status"] for e in history(client, org, failing["id"])]
    assert statuses.count("failed") == 2

    gone = wait_until(
        lambda: (body := read(client, org, archived["id"]))["enabled"] is False and body,
        timeout=10,
    )
    assert gone["paused_reason"] == "paused itself after 3 failed fires in a row"
    entries = history(client, org, archived["id"])
    assert [e["status"] for e in entries] == ["failed"] * 3
    assert all(e["skipped_reason"] == "the agent is archived" for e in entries)

    resumed = client.post(f"/api/v1/schedules/{failing['id']}/resume", headers=org.headers)
    assert resumed.get_json()["enabled"] is True and resumed.get_json()["consecutive_failures"] == 0
    client.post(f"/api/v1/schedules/{failing['id']}/pause", headers=org.headers)


def test_a_webhook_runs_its_agent_on_a_worker(live_client, live_org):
    import hashlib
    import hmac
    import json

    client, org = live_client, live_org
    define(client, org, "echo")
    trigger = client.post(
        "/api/v1/triggers",
        json={"name": "hook", "target": {"agent": "echo"}, "input": {"who": "$.event.user"}},
        headers=org.headers,
    ).get_json()
    raw = json.dumps({"user": "ada", "id": 1}).encode()
    digest = hmac.new(trigger["secret"].encode(), raw, hashlib.sha256).hexdigest()
    response = client.post(
        trigger["url"],
        data=raw,
        headers={
            "X-Runyard-Signature": f"sha256={digest}",
            "X-Runyard-Timestamp": str(int(time.time())),
        },
    )
    assert response.status_code == 202, response.get_json()
    result = wait_for(client, org, response.get_json()["execution_id"])
    assert result["status"] == "succeeded" and result["output"]["echo"] == {"who": "ada"}


@pytest.fixture
def connection_free(app):
    """Run SQL on a committed connection of its own (these tests' rows are really committed)."""
    from app.db import db

    def run(sql, fetch=True, **params):
        with db.engine.begin() as conn:
            result = conn.execute(text(sql), params)
            return result.all() if fetch else None

    return run


def test_a_fire_refused_by_a_quota_is_skipped_naming_the_limit(live_client, live_org, beats):
    from app.db import db
    from app.flow import services as flow

    client, org = live_client, live_org
    define(client, org, "held", queue="idle")
    with db.session() as session:
        flow.set_limits(session, org.name, {"max_queued": 2})
        session.commit()
    created = schedule(client, org, "every-second", "held", overlap="allow", pause_after_failures=1)
    beats.start()
    entries = wait_until(
        lambda: (
            (found := history(client, org, created["id"]))
            and any(e["status"] == "skipped" for e in found)
            and found
        ),
        timeout=10,
    )
    fired = [e for e in entries if e["status"] == "fired"]
    skipped = [e for e in entries if e["status"] == "skipped"]
    assert len(fired) == 2, entries
    assert all("quota max_queued" in e["skipped_reason"] for e in skipped), skipped
    assert read(client, org, created["id"])["enabled"], "a quota skip is no failure: not paused"
