"""Schedules and webhook triggers whose target is a chain, run by a real beat and a real worker.

A chain whose step runs on the queue `idle`, which no worker serves, stays queued: that is how
these tests hold a "previous fire still running".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest

from tests.beat import Beats
from tests.conftest import wait_until
from tests.workers.test_chains_runs import NUMBER, adder, agent, wait_chain
from tests.workers.test_schedules_live import EVERY_SECOND, history, read

pytestmark = pytest.mark.worker


@pytest.fixture
def beats(tmp_path):
    started = Beats(tmp_path)
    yield started
    started.stop_all()


def define_chain(client, org, name, steps, input_schema=NUMBER):
    body = {"name": name, "input_schema": input_schema, "steps": steps}
    response = client.post("/api/v1/chains", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()


def add_twice(client, org, name="twice"):
    adder(client, org)
    define_chain(
        client,
        org,
        name,
        [
            {"name": "one", "agent": "adder"},
            {
                "name": "two",
                "agent": "adder",
                "input": {"value": "$.steps.one.output.value", "by": 10},
            },
        ],
    )


def chain_schedule(client, org, name, chain, **fields):
    body = {"name": name, "target": {"chain": chain}, "cron": EVERY_SECOND, **fields}
    response = client.post("/api/v1/schedules", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_trigger_now_runs_the_whole_chain(live_client, live_org):
    client, org = live_client, live_org
    add_twice(client, org)
    created = chain_schedule(
        client, org, "yearly", "twice", cron="0 0 1 1 *", input={"value": 1}, enabled=False
    )
    assert created["target"] == {"chain": "twice"}
    response = client.post(f"/api/v1/schedules/{created['id']}/trigger", headers=org.headers)
    assert response.status_code == 202, response.get_json()
    fired = response.get_json()
    assert fired["kind"] == "manual" and fired["execution_id"] is None
    body = wait_chain(client, org, fired["chain_execution_id"])
    assert body["status"] == "succeeded", body
    assert body["output"] == {"value": 12}
    assert [step["status"] for step in body["steps"]] == ["succeeded", "succeeded"]
    [entry] = history(client, org, created["id"])
    assert entry["chain_execution_id"] == fired["chain_execution_id"]
    assert entry["execution_id"] is None and entry["execution_status"] == "succeeded"
    assert read(client, org, created["id"])["last_execution_id"] == fired["chain_execution_id"]


def test_beat_fires_chain_schedules_and_counts_failed_chains(live_client, live_org, beats):
    client, org = live_client, live_org
    beats.start()
    add_twice(client, org)
    agent(client, org, "boom", "tests.agents:boom")
    define_chain(client, org, "doomed", [{"name": "explode", "agent": "boom"}], input_schema={})
    ticking = chain_schedule(client, org, "ticking", "twice", input={"value": 5})
    failing = chain_schedule(
        client, org, "failing", "doomed", overlap="allow", pause_after_failures=2
    )
    define_chain(client, org, "retired", [{"name": "one", "agent": "adder"}])
    orphan = chain_schedule(client, org, "orphan", "retired", input={"value": 1})
    client.delete("/api/v1/chains/retired", headers=org.headers)

    def a_succeeded_fire():
        entries = history(client, org, ticking["id"])
        return next((e for e in entries if e["execution_status"] == "succeeded"), None)

    entry = wait_until(a_succeeded_fire, timeout=10)
    assert entry["kind"] == "scheduled" and entry["status"] == "fired"
    assert entry["execution_id"] is None
    assert wait_chain(client, org, entry["chain_execution_id"])["output"] == {"value": 16}
    client.post(f"/api/v1/schedules/{ticking['id']}/pause", headers=org.headers)

    paused = wait_until(
        lambda: (body := read(client, org, failing["id"]))["enabled"] is False and body,
        timeout=10,
    )
    assert paused["paused_reason"] == "paused itself after 2 failed fires in a row"
    failed = [e for e in history(client, org, failing["id"]) if e["execution_status"] == "failed"]
    assert len(failed) >= 2 and all(e["chain_execution_id"] for e in failed)

    client.post(f"/api/v1/schedules/{orphan['id']}/pause", headers=org.headers)
    refused = history(client, org, orphan["id"])
    assert refused and all(e["status"] == "failed" for e in refused)
    assert refused[0]["chain_execution_id"] is None
    assert refused[0]["skipped_reason"] == (
        "the chain cannot run: chain 'retired' is archived and takes no new executions"
    )


def test_overlap_skip_buffer_one_and_cancel_other_see_a_running_chain(live_client, live_org, beats):
    client, org = live_client, live_org
    beats.start()
    agent(client, org, "idler", "tests.agents:echo", queue="idle")
    define_chain(client, org, "held", [{"name": "wait", "agent": "idler"}], input_schema={})
    skip = chain_schedule(client, org, "skip", "held")
    cancel = chain_schedule(client, org, "cancel", "held", overlap="cancel_other")
    buffer = chain_schedule(client, org, "buffer", "held", overlap="buffer_one")
    wait_until(
        lambda: all(len(history(client, org, s["id"])) >= 3 for s in (skip, cancel, buffer)),
        timeout=10,
    )
    for created in (skip, cancel):
        client.post(f"/api/v1/schedules/{created['id']}/pause", headers=org.headers)

    # buffer_one: one fire waits for the chain execution, and runs once that has finished.
    blocking, waiting, *_ = history(client, org, buffer["id"])[::-1]
    assert waiting["status"] == "buffered"
    assert waiting["skipped_reason"] == (
        f"waiting: chain execution {blocking['chain_execution_id']} is still queued"
    )
    client.post(
        f"/api/v1/chain-executions/{blocking['chain_execution_id']}/cancel", headers=org.headers
    )

    def released():
        entries = history(client, org, buffer["id"])
        entry = next(e for e in entries if e["fire_time"] == waiting["fire_time"])
        return entry["status"] == "fired" and entry

    released_entry = wait_until(released, timeout=5)
    client.post(f"/api/v1/schedules/{buffer['id']}/pause", headers=org.headers)
    assert released_entry["chain_execution_id"] and released_entry["execution_id"] is None
    assert (
        read(client, org, buffer["id"])["last_execution_id"]
        == (released_entry["chain_execution_id"])
    )
    client.post(
        f"/api/v1/chain-executions/{released_entry['chain_execution_id']}/cancel",
        headers=org.headers,
    )

    first, *later = history(client, org, skip["id"])[::-1]
    assert first["status"] == "fired" and first["chain_execution_id"]
    assert later and all(entry["status"] == "skipped" for entry in later)
    assert later[-1]["skipped_reason"] == (
        f"overlap skip: chain execution {first['chain_execution_id']} is still queued"
    )

    fires = [e for e in history(client, org, cancel["id"])[::-1] if e["status"] == "fired"]
    assert len(fires) >= 2
    # Each fire cancelled the chain execution of the one before it.
    for entry in fires[:-1]:
        replaced = wait_chain(client, org, entry["chain_execution_id"], timeout=5)
        assert replaced["status"] == "cancelled"
        assert "cancel_other" in replaced["error"]["message"]
    for still_queued in (fires[-1], first):
        response = client.post(
            f"/api/v1/chain-executions/{still_queued['chain_execution_id']}/cancel",
            headers=org.headers,
        )
        assert response.status_code == 202, response.get_json()


def test_a_webhook_with_a_chain_target_runs_it_with_the_event(live_client, live_org):
    client, org = live_client, live_org
    add_twice(client, org)
    response = client.post(
        "/api/v1/triggers",
        json={
            "name": "chain-hook",
            "target": {"chain": "twice", "version": "1.0.0"},
            "input": {"value": "$.event.order.count", "by": 3},
        },
        headers=org.headers,
    )
    assert response.status_code == 201, response.get_json()
    trigger = response.get_json()
    assert trigger["target"] == {"chain": "twice", "version": "1.0.0"}

    def deliver(event):
        raw = json.dumps(event).encode()
        digest = hmac.new(trigger["secret"].encode(), raw, hashlib.sha256).hexdigest()
        return client.post(
            trigger["url"],
            data=raw,
            headers={
                "X-Runyard-Signature": f"sha256={digest}",
                "X-Runyard-Timestamp": str(int(time.time())),
            },
        )

    wrong = deliver({"order": {"count": "seven"}, "id": 1})
    assert wrong.status_code == 422 and "/input/value" in wrong.get_json()["errors"]
    delivered = deliver({"order": {"count": 7}, "id": 2})
    assert delivered.status_code == 202, delivered.get_json()
    body = delivered.get_json()
    assert "execution_id" not in body
    result = wait_chain(client, org, body["chain_execution_id"])
    assert result["status"] == "succeeded" and result["input"] == {"value": 7, "by": 3}
    assert result["output"] == {"value": 20}
