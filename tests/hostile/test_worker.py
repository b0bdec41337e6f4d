"""Hostile input that reaches a real worker: a pickled message, an output against a catastrophic
pattern."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.conftest import wait_for, wait_until
from tests.workers.test_runs import run

pytestmark = pytest.mark.worker

# A queue no worker of the suite serves: the API's own (JSON) message for the execution waits
# there, so only the hostile message could start it.
PARKED_QUEUE = "hostile-parked"


class WritesAFileWhenUnpickled:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def publish_pickled_run(execution_id: str, marker: str) -> None:
    """A `runyard.run_execution` message for the execution, pickled, straight on `default`."""
    from workers import app as celery_app

    queue = celery_app.amqp.queues["default"]
    task_id = str(uuid.uuid4())
    headers, _properties, body, _sent_event = celery_app.amqp.as_task_v2(
        task_id, "runyard.run_execution", args=[execution_id], kwargs={}
    )
    args, kwargs, embed = body
    with celery_app.producer_or_acquire() as producer:
        producer.publish(
            ([*args, WritesAFileWhenUnpickled(marker)], kwargs, embed),
            exchange="",
            routing_key=queue.name,
            serializer="pickle",
            headers=headers,
            correlation_id=task_id,
        )


def test_a_pickled_message_is_refused_and_runs_nothing(live_client, live_org, worker, tmp_path):
    headers = live_org.headers
    agent = {
        "name": "parked",
        "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
        "queue": PARKED_QUEUE,
    }
    assert live_client.post("/api/v1/agents", json=agent, headers=headers).status_code == 201
    submitted = live_client.post(
        "/api/v1/agents/parked/executions", json={"input": {}}, headers=headers
    )
    assert submitted.status_code == 202
    execution_id = submitted.get_json()["id"]
    marker = tmp_path / "unpickled"
    log_size = worker.stat().st_size

    publish_pickled_run(execution_id, str(marker))

    wait_until(lambda: b"ContentDisallowed" in worker.read_bytes()[log_size:], timeout=20)
    assert b"pickle" in worker.read_bytes()[log_size:]
    execution = live_client.get(f"/api/v1/executions/{execution_id}", headers=headers).get_json()
    assert execution["status"] == "queued" and execution["attempts"] == 0, execution
    attempts = live_client.get(f"/api/v1/executions/{execution_id}/attempts", headers=headers)
    assert attempts.get_json() == []
    assert not marker.exists()
    # The worker is alive and serving: the refusal was the message's, not a crash.
    echo = {"name": "echo", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}}
    assert live_client.post("/api/v1/agents", json=echo, headers=headers).status_code == 201
    run = live_client.post("/api/v1/agents/echo/executions", json={"input": {}}, headers=headers)
    assert wait_for(live_client, live_org, run.get_json()["id"])["status"] == "succeeded"
    assert not marker.exists()


def test_an_output_against_a_catastrophic_pattern_fails_quickly_in_the_worker(
    live_client, live_org, worker
):
    """`echo` returns its input under `echo`: the output schema's pattern sees the hostile text."""
    agent = {
        "name": "echo-regex",
        "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
        "output_schema": {
            "type": "object",
            "properties": {
                "echo": {
                    "type": "object",
                    "properties": {"text": {"type": "string", "pattern": "^(a+)+$"}},
                }
            },
        },
        "timeout_seconds": 60,
    }
    headers = live_org.headers
    assert live_client.post("/api/v1/agents", json=agent, headers=headers).status_code == 201
    submit = "/api/v1/agents/echo-regex/executions"
    started = time.monotonic()
    hostile = live_client.post(submit, json={"input": {"text": "a" * 5000 + "!"}}, headers=headers)
    finished = wait_for(live_client, live_org, hostile.get_json()["id"], timeout=30)
    assert time.monotonic() - started < 30
    assert finished["status"] == "failed", finished
    assert finished["error"]["type"] == "output_invalid", finished["error"]
    assert "/echo/text" in finished["error"]["message"], finished["error"]
    fine = live_client.post(submit, json={"input": {"text": "aaaa"}}, headers=headers)
    assert wait_for(live_client, live_org, fine.get_json()["id"])["status"] == "succeeded"


UNSTORABLE_OUTPUTS = """
def main(input, ctx):
    return {
        "high": {"t": "a" + chr(0xD800)},
        "key": {"k" + chr(0xDC00): 1},
        "nul": {"t": ["ok", chr(0)]},
        "pair": {"t": chr(0x1F600) + chr(0xFFFF)},
        "nan": {"x": [1.5, float("nan")]},
    }[input["kind"]]
"""


def test_an_output_holding_unstorable_text_fails_output_invalid(live_client, live_org, worker):
    """An output with a lone surrogate failed the finish write (jsonb refuses it); with NUL it
    was caught. Both now fail `output_invalid` naming the place; a valid non-BMP character (which
    json.dumps escapes as a surrogate pair) still succeeds."""
    expected = {
        "high": "'/t': contains an unpaired surrogate (U+D800) at character 1",
        "key": "'/k\\udc00': the key contains an unpaired surrogate (U+DC00) at character 1",
        "nul": "'/t/1': contains U+0000 (NUL)",
        "nan": "'/x/1': NaN or an infinite number",
    }
    source = {"type": "script", "language": "python", "source": UNSTORABLE_OUTPUTS}
    agent = {"name": "unstorable", "runtime": source, "timeout_seconds": 60}
    headers = live_org.headers
    assert live_client.post("/api/v1/agents", json=agent, headers=headers).status_code == 201
    ids = {kind: run(live_client, live_org, "unstorable", {"kind": kind}) for kind in expected}
    ids["pair"] = run(live_client, live_org, "unstorable", {"kind": "pair"})
    finished = {kind: wait_for(live_client, live_org, id_, timeout=60) for kind, id_ in ids.items()}
    assert finished["pair"]["status"] == "succeeded", finished["pair"]
    assert finished["pair"]["output"] == {"t": "\U0001f600\uffff"}
    for kind, detail in expected.items():
        execution = finished[kind]
        assert execution["status"] == "failed", execution
        assert execution["attempts"] == 1, execution
        assert execution["error"]["type"] == "output_invalid", execution["error"]
        assert detail in execution["error"]["message"], execution["error"]
        assert "cannot be stored" in execution["error"]["message"]
