"""A real worker shows what each task is: its log and `celery inspect active` (what Flower's
worker pages read) name the agent version and organization, or the chain and step, not
`runyard.run_execution` and an id. The sweeper's republish carries the same labels.
(Every other publish, read from the raw messages: tests/app/test_flower_labels.py.)"""

from __future__ import annotations

import json
import socket
import uuid

import pytest

from app import broker
from app.executions import recovery
from tests.conftest import RUN_ID, wait_for, wait_until
from tests.workers.test_chains_runs import adder, chain, run, wait_chain
from tests.workers.test_sweeper import QUEUE, agent_id, insert_queued, settle_marker  # noqa: F401
from tests.workers.test_sweeper import broker as sweeper_broker  # noqa: F401 (fixture)

pytestmark = pytest.mark.worker


def make_agent(client, org, name: str, entrypoint: str) -> None:
    response = client.post(
        "/api/v1/agents",
        json={"name": name, "runtime": {"type": "python", "entrypoint": entrypoint}},
        headers=org.headers,
    )
    assert response.status_code == 201, response.get_json()


def test_the_sweepers_republish_is_labelled(agent_id, sweeper_broker, live_org):  # noqa: F811
    settle_marker()
    ids = insert_queued(agent_id, 3, dispatched=False)
    assert recovery.sweep().republished >= len(ids)
    published = {}
    for key in sweeper_broker.keys(f"{QUEUE}*"):
        for raw in sweeper_broker.lrange(key, 0, -1):
            headers = json.loads(raw)["headers"]
            published[headers["id"]] = headers
    for execution_id in map(str, ids):
        assert published[execution_id]["shadow"] == "run unserved@1.0.0"
        assert published[execution_id]["argsrepr"] == (
            f"'{execution_id}' unserved@1.0.0 org={live_org.name}"
        )


def test_the_worker_log_and_inspect_name_the_agent_version_and_organization(
    live_client, live_org, worker
):
    make_agent(live_client, live_org, "flower-sleepy", "tests.agents:sleepy")
    response = live_client.post(
        "/api/v1/agents/flower-sleepy/executions",
        json={"input": {"seconds": 2}},
        headers=live_org.headers,
    )
    assert response.status_code == 202, response.get_json()
    execution_id = response.get_json()["id"]
    me = f"test-{RUN_ID}@{socket.gethostname()}"

    def running() -> dict | None:
        replies = broker.celery_app.control.inspect(destination=[me], timeout=1).active(safe=True)
        return next(
            (task for task in (replies or {}).get(me, []) if task["id"] == execution_id), None
        )

    task = wait_until(running, timeout=10, interval=0.2)
    assert task["name"] == "run flower-sleepy@1.0.0"
    assert task["type"] == broker.RUN_TASK
    assert task["args"] == f"'{execution_id}' flower-sleepy@1.0.0 org={live_org.name}"
    assert wait_for(live_client, live_org, execution_id)["status"] == "succeeded"
    wait_until(
        lambda: f"Task run flower-sleepy@1.0.0[{execution_id}] succeeded" in worker.read_text()
    )
    assert f"Task run flower-sleepy@1.0.0[{execution_id}] received" in worker.read_text()


def test_a_chain_step_the_worker_publishes_keeps_its_labels(live_client, live_org, worker):
    """The second step's message is sent by the worker that ran the first, from the canvas."""
    adder(live_client, live_org)
    name = f"c{uuid.uuid4().hex[:6]}"
    chain(
        live_client,
        live_org,
        [
            {"name": "first", "agent": "adder"},
            {"name": "second", "agent": "adder", "input": {"value": "$.steps.first.output.value"}},
        ],
        name=name,
    )
    chain_execution_id = run(live_client, live_org, {"value": 1}, name=name)
    assert wait_chain(live_client, live_org, chain_execution_id)["status"] == "succeeded"
    for step in ("first", "second"):
        wait_until(lambda step=step: f"Task step {name}@1.0.0/{step}[" in worker.read_text())
