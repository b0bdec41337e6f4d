"""What Flower, `celery inspect` and the workers' logs show of each message: Celery's protocol 2
headers `shadow` (the name shown) and `argsrepr` (the arguments shown), read here from the raw
messages in Redis, for every way an execution or a chain step is published.

The agents route to a queue no worker serves, so the messages stay in Redis to be read.
(A real worker showing them: tests/workers/test_flower_labels_live.py.)"""

from __future__ import annotations

import base64
import dataclasses
import json
import uuid

import pytest
import redis
from sqlalchemy import text

from app import broker
from app.config import current_config, use_config
from app.executions import dispatch, store
from app.executions.versions import specs
from tests.app.test_executions_api import ECHO, make_agent, submit

QUEUE = f"flower-labels-{uuid.uuid4().hex[:8]}"
SECRET = "s3cret-in-the-input"


@pytest.fixture
def queued():
    """The raw messages waiting in QUEUE (every priority list of it), as kombu stored them."""
    client = redis.Redis.from_url(current_config().broker_url)

    def read() -> list[dict]:
        return [
            json.loads(raw) for key in client.keys(f"{QUEUE}*") for raw in client.lrange(key, 0, -1)
        ]

    yield read
    client.delete(*client.keys(f"{QUEUE}*") or ["-"])


@pytest.fixture
def agent(client, org, connection) -> dict:
    return make_agent(client, org, {**ECHO, "name": "summarize-ticket", "queue": QUEUE})


def run_headers(messages: list[dict]) -> dict[str, dict]:
    """Execution id -> the headers of its run message."""
    return {
        m["headers"]["id"]: m["headers"]
        for m in messages
        if m["headers"]["task"] == broker.RUN_TASK
    }


def assert_labelled(headers: dict, execution_id: str, org) -> None:
    assert headers["task"] == broker.RUN_TASK, "the task run is unchanged: only its shown name"
    assert headers["shadow"] == "run summarize-ticket@1.0.0"
    assert headers["argsrepr"] == f"'{execution_id}' summarize-ticket@1.0.0 org={org.name}"


def test_a_submit_is_published_with_its_agent_version_and_organization(client, org, agent, queued):
    response = submit(client, org, {"text": SECRET}, agent="summarize-ticket")
    assert response.status_code == 202, response.get_json()
    execution_id = response.get_json()["id"]
    messages = queued()
    assert_labelled(run_headers(messages)[execution_id], execution_id, org)
    assert SECRET not in json.dumps(messages), "the input is never in a message"


def test_every_message_of_a_batch_submit_is_labelled(client, org, agent, queued):
    response = client.post(
        "/api/v1/agents/summarize-ticket/executions/batch",
        json={"items": [{"input": {"text": f"{SECRET}-{n}"}} for n in range(3)]},
        headers=org.headers,
    )
    assert response.status_code == 202, response.get_json()
    ids = response.get_json()["ids"]
    messages = queued()
    published = run_headers(messages)
    assert sorted(published) == sorted(ids)
    for execution_id in ids:
        assert_labelled(published[execution_id], execution_id, org)
    assert SECRET not in json.dumps(messages)


def test_a_message_sent_one_by_one_is_labelled_too(client, org, agent, queued, connection):
    """dispatch.publish (a retry waiting out its backoff) goes through send_task."""
    execution_id = submit(client, org, agent="summarize-ticket").get_json()["id"]
    version_id = connection.execute(
        text("SELECT version_id FROM executions WHERE id = :id"), {"id": execution_id}
    ).scalar()
    spec = specs.get(connection, version_id)
    assert dataclasses.replace(spec, org_name=None).org_label == str(org.id)
    assert dispatch.publish(uuid.UUID(execution_id), spec, 5, countdown=30)
    sent = [m for m in queued() if m["headers"]["eta"]]
    assert len(sent) == 1
    assert_labelled(sent[0]["headers"], execution_id, org)


@pytest.fixture
def fair_window():
    saved = current_config()
    use_config(dataclasses.replace(saved, fair_window=3))
    yield 3
    use_config(saved)


def test_executions_let_out_of_the_fair_window_are_labelled(
    client, org, agent, queued, connection, fair_window
):
    from app.executions import gates

    response = client.post(
        "/api/v1/agents/summarize-ticket/executions/batch",
        json={"items": [{"input": {"text": str(n)}} for n in range(5)]},
        headers=org.headers,
    )
    ids = response.get_json()["ids"]
    assert sorted(run_headers(queued())) == sorted(ids[:3]), "two wait in PostgreSQL"
    store.claim(connection, uuid.UUID(ids[0]), "w", 60, fair_window)
    _claimed, let_out = store.claim(connection, uuid.UUID(ids[1]), "w", 60, fair_window)
    assert [str(out.execution_id) for out in let_out] == ids[3:]
    # What a worker does once its claim has committed.
    gates.publish(connection, let_out)
    published = run_headers(queued())
    for execution_id in ids[3:]:
        assert_labelled(published[execution_id], execution_id, org)


NUMBER = {"type": "object", "required": ["value"], "properties": {"value": {"type": "integer"}}}


def test_chain_steps_are_labelled_with_their_chain_step_and_agent(client, org, queued, connection):
    make_agent(
        client,
        org,
        {
            "name": "adder",
            "runtime": {"type": "python", "entrypoint": "tests.agents:add"},
            "input_schema": NUMBER,
            "output_schema": NUMBER,
            "queue": QUEUE,
        },
    )
    chain = {
        "name": "triage",
        "input_schema": NUMBER,
        "steps": [
            {"name": "start", "agent": "adder"},
            {
                "name": "fan",
                "parallel": [
                    {"name": "left", "agent": "adder"},
                    {"name": "right", "agent": "adder"},
                ],
            },
        ],
    }
    response = client.post("/api/v1/chains", json=chain, headers=org.headers)
    assert response.status_code == 201, response.get_json()
    response = client.post(
        "/api/v1/chains/triage/executions", json={"input": {"value": 1}}, headers=org.headers
    )
    assert response.status_code == 202, response.get_json()
    chain_execution_id = response.get_json()["id"]
    [first] = queued()
    headers = first["headers"]
    assert headers["task"] == broker.STEP_TASK
    assert headers["shadow"] == "step triage@1.0.0/start"
    assert headers["argsrepr"] == (
        f"'{chain_execution_id}' stage=0 index=0 adder@1.0.0 org={org.name}"
    )
    # The next stage (a group) is published by the worker that runs this step, from the
    # options the canvas carries: each of its steps keeps its own labels.
    _args, _kwargs, embed = json.loads(base64.b64decode(first["body"]))
    [group] = embed["chain"]
    shown = sorted(
        (task["options"]["shadow"], task["options"]["argsrepr"])
        for task in group["kwargs"]["tasks"]
    )
    assert shown == [
        (
            "step triage@1.0.0/left",
            f"'{chain_execution_id}' stage=1 index=1 adder@1.0.0 org={org.name}",
        ),
        (
            "step triage@1.0.0/right",
            f"'{chain_execution_id}' stage=1 index=2 adder@1.0.0 org={org.name}",
        ),
    ]


def test_labels_are_bounded():
    long = "x" * 300
    message = broker.RunMessage(uuid.uuid4(), "q", 5, 10, 20, long, "1.0.0", long)
    shadow, argsrepr = message.labels()
    assert shadow == f"run {'x' * (broker.LABEL_MAX - 3)}...@1.0.0"
    assert len(argsrepr) < 2 * broker.LABEL_MAX + 60
    assert argsrepr.endswith(f" org={'x' * (broker.LABEL_MAX - 3)}...")
