"""Chains run by a real worker: data flow, fan-out and fan-in, failure, cancel, retry, and a
chain that finishes after the broker lost its next message."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from app.broker import MARKER_QUEUE, celery_app
from app.chains import launch, progress
from app.db import db
from tests.brokers import on_rabbitmq, queue_depth
from tests.conftest import REDIS_CLAIM_KEY, ROOT, RUN_ID, wait_until
from workers import maintenance

pytestmark = pytest.mark.worker

ADD = {"type": "python", "entrypoint": "tests.agents:add"}
NUMBER = {"type": "object", "required": ["value"], "properties": {"value": {"type": "integer"}}}
ADD_IN = {**NUMBER, "properties": {"value": {"type": "integer"}, "by": {"type": "integer"}}}


def agent(client, org, name, entrypoint, **extra):
    body = {"name": name, "runtime": {"type": "python", "entrypoint": entrypoint}, **extra}
    response = client.post("/api/v1/agents", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()


def adder(client, org, name="adder", **extra):
    agent(
        client,
        org,
        name,
        "tests.agents:add",
        input_schema=ADD_IN,
        output_schema=NUMBER,
        **extra,
    )


def chain(client, org, steps, **extra):
    body = {"name": "c", "input_schema": ADD_IN, "steps": steps, **extra}
    response = client.post("/api/v1/chains", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()


def run(client, org, payload, name="c"):
    response = client.post(
        f"/api/v1/chains/{name}/executions", json={"input": payload}, headers=org.headers
    )
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def read(client, org, chain_execution_id):
    return client.get(
        f"/api/v1/chain-executions/{chain_execution_id}", headers=org.headers
    ).get_json()


def wait_chain(client, org, chain_execution_id, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        body = read(client, org, chain_execution_id)
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"chain still {body['status']} after {timeout}s: {body}")
        time.sleep(0.05)


def steps_of(body):
    steps = {("step", s["name"]): s for s in body["steps"]}
    return steps | {("compensate", s["name"]): s for s in body["compensations"]}


def step_rows(chain_execution_id):
    with db.hot() as conn:
        return conn.execute(
            text(
                "SELECT chain_role, chain_step, status, attempt, input, output FROM executions "
                "WHERE chain_execution_id = :id ORDER BY chain_stage, chain_step"
            ),
            {"id": chain_execution_id},
        ).all()


def test_linear_chain_with_mapping(live_client, live_org, other_live_org):
    adder(live_client, live_org)
    chain(
        live_client,
        live_org,
        [
            {"name": "one", "agent": "adder"},
            {
                "name": "two",
                "agent": "adder",
                "input": {"value": "$.steps.one.output.value", "by": 10},
            },
            {"name": "three", "agent": "adder", "input": {"value": "$.input.value", "by": 100}},
            {"name": "four", "agent": "adder"},
        ],
    )
    ce = run(live_client, live_org, {"value": 1})
    body = wait_chain(live_client, live_org, ce)
    assert body["status"] == "succeeded", body
    assert body["output"] == {"value": 102}
    assert [s["status"] for s in body["steps"]] == ["succeeded"] * 4
    rows = step_rows(ce)
    assert [r.input for r in rows] == [
        {"value": 1},
        {"value": 2, "by": 10},
        {"value": 1, "by": 100},
        {"value": 101},
    ]
    assert all(r.attempt == 1 for r in rows)
    # Steps are ordinary executions that name their chain execution.
    one = live_client.get(
        f"/api/v1/executions/{body['steps'][0]['execution_id']}", headers=live_org.headers
    ).get_json()
    assert one["chain_execution_id"] == ce and one["output"] == {"value": 2}
    listed = live_client.get(
        f"/api/v1/executions?chain_execution_id={ce}", headers=live_org.headers
    ).get_json()
    assert len(listed) == 4 and {e["chain_execution_id"] for e in listed} == {ce}
    assert {e["id"] for e in listed} == {s["execution_id"] for s in body["steps"]}
    # Another organization sees none of its steps, whichever way it asks.
    assert (
        live_client.get(
            f"/api/v1/executions?chain_execution_id={ce}", headers=other_live_org.headers
        ).get_json()
        == []
    )
    assert all(
        live_client.get(
            f"/api/v1/executions/{s['execution_id']}", headers=other_live_org.headers
        ).status_code
        == 404
        for s in body["steps"]
    )


def test_parallel_fans_out_and_back_in(live_client, live_org):
    adder(live_client, live_org)
    chain(
        live_client,
        live_org,
        [
            {"name": "start", "agent": "adder"},
            {
                "name": "fan",
                "parallel": [
                    {
                        "name": "left",
                        "agent": "adder",
                        "input": {"value": "$.steps.start.output.value", "by": 10},
                    },
                    {
                        "name": "right",
                        "agent": "adder",
                        "input": {"value": "$.steps.start.output.value", "by": 20},
                    },
                    {"name": "middle", "agent": "adder"},
                ],
            },
            {
                "name": "merge",
                "agent": "adder",
                "input": {"value": "$.steps.left.output.value", "by": "$.steps.right.output.value"},
            },
        ],
    )
    ce = run(live_client, live_org, {"value": 0})
    body = wait_chain(live_client, live_org, ce)
    assert body["status"] == "succeeded", body
    assert body["output"] == {"value": 32}  # (1 + 10) + (1 + 20)
    assert {s["name"]: s["stage"] for s in body["steps"]} == {
        "start": 0,
        "left": 1,
        "right": 1,
        "middle": 1,
        "merge": 2,
    }
    rows = step_rows(ce)
    assert len(rows) == 5 and all(r.status == "succeeded" and r.attempt == 1 for r in rows)
    merge = next(s for s in body["steps"] if s["name"] == "merge")
    fanned = [s for s in body["steps"] if s["stage"] == 1]
    assert merge["started_at"] >= max(s["finished_at"] for s in fanned), "fan-in waited"


def test_stop_skips_the_rest_and_compensates_in_reverse(live_client, live_org):
    adder(live_client, live_org)
    agent(live_client, live_org, "undo", "tests.agents:echo")
    agent(live_client, live_org, "boom", "tests.agents:boom")
    chain(
        live_client,
        live_org,
        [
            {"name": "a", "agent": "adder", "compensate": {"agent": "undo"}},
            {
                "name": "b",
                "agent": "adder",
                "compensate": {
                    "agent": "undo",
                    "input": {"was": "$.steps.b.output.value", "chain": "$.input.value"},
                },
            },
            {"name": "c", "agent": "adder"},
            {"name": "bad", "agent": "boom", "compensate": {"agent": "undo"}},
            {"name": "never", "agent": "adder", "input": {"value": 1}},
        ],
    )
    ce = run(live_client, live_org, {"value": 5})
    wait_until(lambda: read(live_client, live_org, ce)["status"] == "failed", timeout=30)
    body = read(live_client, live_org, ce)
    assert body["error"]["type"] == "step_failed" and "'bad'" in body["error"]["message"]
    assert "compensations: all 2 succeeded" in body["error"]["message"]
    steps = steps_of(body)
    assert steps[("step", "bad")]["status"] == "failed"
    assert steps[("step", "never")]["status"] == "skipped"
    assert steps[("step", "never")]["execution_id"] is None
    # The steps list holds the steps only: a step read by its name is the step, not its undoing.
    assert [(s["name"], s["status"]) for s in body["steps"]] == [
        ("a", "succeeded"),
        ("b", "succeeded"),
        ("c", "succeeded"),
        ("bad", "failed"),
        ("never", "skipped"),
    ]
    compensations = body["compensations"]
    # Only steps that succeeded and have a compensate agent, latest first.
    assert [s["name"] for s in compensations] == ["b", "a"]
    assert all(s["status"] == "succeeded" for s in compensations)
    assert compensations[0]["finished_at"] <= compensations[1]["started_at"]
    rows = {(r.chain_role, r.chain_step): r for r in step_rows(ce)}
    assert rows[("compensate", 1)].input == {"was": 7, "chain": 5}
    assert rows[("compensate", 0)].input == {"value": 6}  # a's own output by default
    assert ("step", 4) not in rows


def test_stop_waits_for_a_running_sibling_before_compensating(live_client, live_org):
    adder(live_client, live_org)
    agent(live_client, live_org, "undo", "tests.agents:echo")
    agent(live_client, live_org, "late-boom", "tests.agents:late_boom")
    agent(live_client, live_org, "sleepy", "tests.agents:sleepy")
    chain(
        live_client,
        live_org,
        [
            {"name": "a", "agent": "adder", "compensate": {"agent": "undo"}},
            {
                "name": "fan",
                "parallel": [
                    # Fails while its sibling still runs.
                    {"name": "bad", "agent": "late-boom", "input": {"seconds": 0.3}},
                    {
                        "name": "slow",
                        "agent": "sleepy",
                        "input": {"seconds": 1.2},
                        "compensate": {"agent": "undo"},
                    },
                ],
            },
            {"name": "never", "agent": "adder", "input": {"value": 1}},
        ],
    )
    ce = run(live_client, live_org, {"value": 1})
    wait_until(lambda: read(live_client, live_org, ce)["status"] == "failed", timeout=30)
    body = read(live_client, live_org, ce)
    steps = steps_of(body)
    assert steps[("step", "bad")]["status"] == "failed"
    assert steps[("step", "slow")]["status"] == "succeeded", "the sibling was let finish"
    assert steps[("step", "bad")]["finished_at"] < steps[("step", "slow")]["finished_at"], (
        "the failure came while the sibling still ran"
    )
    assert steps[("step", "never")]["status"] == "skipped"
    compensations = body["compensations"]
    assert [s["name"] for s in compensations] == ["slow", "a"]
    assert compensations[0]["started_at"] >= steps[("step", "slow")]["finished_at"]
    assert all(s["status"] == "succeeded" for s in compensations)


def test_continue_goes_on_after_a_failure(live_client, live_org):
    adder(live_client, live_org)
    # Declares the adder's output, so the step after it type-checks, then fails at runtime.
    agent(live_client, live_org, "boom", "tests.agents:boom", output_schema=NUMBER)
    chain(
        live_client,
        live_org,
        [
            {"name": "a", "agent": "adder"},
            {"name": "bad", "agent": "boom"},
            {"name": "orphan", "agent": "adder"},
            {"name": "d", "agent": "adder", "input": {"value": "$.steps.a.output.value"}},
        ],
        on_failure="continue",
    )
    ce = run(live_client, live_org, {"value": 1})
    body = wait_chain(live_client, live_org, ce)
    assert [s["status"] for s in body["steps"]] == ["succeeded", "failed", "failed", "succeeded"]
    assert body["status"] == "failed" and "'bad', 'orphan'" in body["error"]["message"]
    assert body["output"] == {"value": 3}
    # The step after the failed one got no output to read: its input is refused, not run.
    orphan = live_client.get(
        f"/api/v1/executions/{body['steps'][2]['execution_id']}", headers=live_org.headers
    ).get_json()
    assert orphan["error"]["type"] == "input_invalid" and orphan["attempts"] == 0
    assert "'orphan'" in orphan["error"]["message"]


def test_a_chain_that_is_one_parallel_group(live_client, live_org):
    adder(live_client, live_org)
    chain(
        live_client,
        live_org,
        [
            {
                "name": "both",
                "parallel": [
                    {"name": "x", "agent": "adder"},
                    {"name": "y", "agent": "adder", "input": {"value": "$.input.value", "by": 2}},
                ],
            }
        ],
    )
    ce = run(live_client, live_org, {"value": 1})
    body = wait_chain(live_client, live_org, ce)
    assert body["status"] == "succeeded" and body["output"] == {
        "x": {"value": 2},
        "y": {"value": 3},
    }


def test_cancel_mid_chain_stops_the_running_step_and_skips_the_rest(live_client, live_org):
    adder(live_client, live_org)
    agent(live_client, live_org, "waiter", "tests.agents:wait_for_cancel")
    chain(
        live_client,
        live_org,
        [
            {"name": "a", "agent": "adder"},
            {"name": "wait", "agent": "waiter", "input": {"seconds": 20}},
            {"name": "after", "agent": "adder", "input": {"value": 1}},
        ],
    )
    ce = run(live_client, live_org, {"value": 1})
    wait_until(
        lambda: steps_of(read(live_client, live_org, ce))[("step", "wait")]["status"] == "running",
        timeout=15,
    )
    response = live_client.post(f"/api/v1/chain-executions/{ce}/cancel", headers=live_org.headers)
    assert response.status_code == 202 and response.get_json()["status"] == "cancelled"
    wait_until(
        lambda: (
            steps_of(read(live_client, live_org, ce))[("step", "wait")]["status"] == "cancelled"
        ),
        timeout=10,
    )
    body = read(live_client, live_org, ce)
    assert body["status"] == "cancelled"
    assert [s["status"] for s in body["steps"]] == ["succeeded", "cancelled", "skipped"]
    waited = body["steps"][1]["execution_id"]

    def error_of_wait():
        path = f"/api/v1/executions/{waited}"
        return live_client.get(path, headers=live_org.headers).get_json()["error"]

    wait_until(lambda: error_of_wait()["message"].startswith("cancelled with its chain ("), 10)
    time.sleep(0.5)
    assert len(step_rows(ce)) == 2, "nothing started after the cancel"
    again = live_client.post(f"/api/v1/chain-executions/{ce}/cancel", headers=live_org.headers)
    assert again.status_code == 409 and ce in again.get_json()["hint"]


def test_a_step_retries_by_its_agents_policy_inside_a_parallel_group(live_client, live_org):
    adder(live_client, live_org)
    agent(
        live_client,
        live_org,
        "flaky",
        "tests.agents:flaky",
        retry={"max_retries": 3, "backoff_seconds": 0.2, "jitter": False},
    )
    chain(
        live_client,
        live_org,
        [
            {"name": "a", "agent": "adder"},
            {
                "name": "fan",
                "parallel": [
                    {"name": "shaky", "agent": "flaky", "input": {"succeed_on": 3}},
                    {"name": "steady", "agent": "adder"},
                ],
            },
            {"name": "z", "agent": "adder", "input": {"value": "$.steps.steady.output.value"}},
        ],
    )
    ce = run(live_client, live_org, {"value": 1})
    body = wait_chain(live_client, live_org, ce)
    assert body["status"] == "succeeded", body
    steps = steps_of(body)
    assert steps[("step", "shaky")]["attempts"] == 3
    assert steps[("step", "z")]["started_at"] >= steps[("step", "shaky")]["finished_at"]
    rows = step_rows(ce)
    assert len(rows) == 4 and body["output"] == {"value": 4}


def lose_broker_data(held: str) -> None:
    """What a broker that lost its data does to the run: every queued message goes, the next
    step's (waiting in `held`) with them. Redis: the run's own database flushed, its routing
    put back for the session worker's remote control. RabbitMQ: the held queue purged and the
    sweeper's marker queue deleted (the run's vhost itself stays, for the session worker)."""
    if on_rabbitmq():
        with celery_app.connection_for_write() as connection:
            channel = connection.channel()
            channel.queue_purge(held)
            channel.queue_delete(MARKER_QUEUE)
        return
    url = os.environ["REDIS_URL"]
    assert not url.endswith("/0"), "this test flushes the run's own Redis database, never 0"
    broker = redis.Redis.from_url(url)
    bindings = {key: broker.smembers(key) for key in broker.scan_iter("_kombu.binding.*")}
    broker.flushdb()
    broker.set(REDIS_CLAIM_KEY, RUN_ID, ex=3600)
    for key, members in bindings.items():
        broker.sadd(key, *members)


@contextlib.contextmanager
def worker_on(queue: str, log_path):
    """A worker of this test's own, serving one queue; always stopped at the end."""
    celery = Path(sys.executable).parent / "celery"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                str(celery),
                "-A",
                "workers",
                "worker",
                "-P",
                "solo",
                "-Q",
                queue,
                "--without-gossip",
                "--without-mingle",
                "-l",
                "INFO",
                "-n",
                f"held-{RUN_ID}@%h",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: b" ready." in log_path.read_bytes() or process.poll() is not None, 30)
        assert process.poll() is None, log_path.read_text()[-3000:]
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_chain_finishes_after_the_broker_lost_its_next_message(live_client, live_org, tmp_path):
    held = f"held-{RUN_ID}"
    adder(live_client, live_org)
    # No worker serves this queue yet: the next step's message waits in Redis.
    adder(live_client, live_org, "held-adder", queue=held)
    chain(
        live_client,
        live_org,
        [
            {"name": "first", "agent": "adder"},
            {"name": "next", "agent": "held-adder"},
            {"name": "last", "agent": "adder"},
        ],
    )
    ce = run(live_client, live_org, {"value": 1})
    wait_until(lambda: queue_depth(held) > 0, timeout=15)
    lose_broker_data(held)
    with worker_on(held, tmp_path / "held-worker.log"):
        time.sleep(0.5)
        body = read(live_client, live_org, ce)
        assert body["status"] == "running"
        assert [s["status"] for s in body["steps"]] == ["succeeded", "pending", "pending"]
        assert uuid.UUID(ce) in progress.resume_stalled(grace_seconds=0.2)
        body = wait_chain(live_client, live_org, ce)
    assert body["status"] == "succeeded" and body["output"] == {"value": 4}
    rows = step_rows(ce)
    assert [(r.chain_step, r.status, r.attempt) for r in rows] == [
        (0, "succeeded", 1),
        (1, "succeeded", 1),
        (2, "succeeded", 1),
    ], "each step ran once"
    assert uuid.UUID(ce) not in progress.resume_stalled(grace_seconds=0), "nothing left to resume"


def _version_of(chain_execution_id):
    with db.hot() as conn:
        return conn.execute(
            text("SELECT chain_version_id FROM chain_executions WHERE id = :id"),
            {"id": chain_execution_id},
        ).scalar_one()


def test_under_stop_a_late_message_never_runs_the_step_after_a_failure(live_client, live_org):
    """The chain's move to `compensating` did not happen (its reconcile hit a database error,
    say) and the next stage's message arrives anyway: the step must not run."""
    adder(live_client, live_org)
    agent(live_client, live_org, "undo", "tests.agents:echo")
    agent(live_client, live_org, "boom", "tests.agents:boom", output_schema=NUMBER)
    chain(
        live_client,
        live_org,
        [
            {"name": "a", "agent": "adder", "compensate": {"agent": "undo"}},
            {"name": "bad", "agent": "boom"},
            {"name": "never", "agent": "adder"},
        ],
    )
    ce = run(live_client, live_org, {"value": 1})
    wait_chain(live_client, live_org, ce)
    with db.hot() as conn:
        # Back to how the chain stood had nothing acted on the failure.
        conn.execute(
            text("DELETE FROM executions WHERE chain_execution_id = :id AND chain_role <> 'step'"),
            {"id": ce},
        )
        conn.execute(
            text(
                "UPDATE chain_executions SET status = 'running', error = NULL, "
                "compensation = NULL, finished_at = NULL WHERE id = :id"
            ),
            {"id": ce},
        )
        assert launch.publish_from(conn, uuid.UUID(ce), _version_of(ce), 2)
    body = wait_chain(live_client, live_org, ce)
    assert body["status"] == "failed" and "'bad'" in body["error"]["message"]
    assert steps_of(body)[("step", "never")]["status"] == "skipped"
    assert [(r.chain_role, r.chain_step) for r in step_rows(ce)] == [
        ("step", 0),
        ("step", 1),
        ("compensate", 0),
    ], "the step after the failure never ran; the compensation did"


def test_the_sweep_that_notices_a_broker_data_loss_resumes_chains_at_once(
    live_client, live_org, tmp_path
):
    """No waiting out RUNYARD_CHAIN_STALL_SECONDS (60 s here) once the sweeper knows messages
    were lost: the chain whose next step message went with the flush goes on from that sweep."""
    held = f"held-{RUN_ID}"
    adder(live_client, live_org)
    adder(live_client, live_org, "held-adder", queue=held)
    chain(
        live_client,
        live_org,
        [{"name": "first", "agent": "adder"}, {"name": "next", "agent": "held-adder"}],
    )
    maintenance.sweep()  # the marker is set: the loss below is the one to notice
    ce = run(live_client, live_org, {"value": 1})
    wait_until(lambda: queue_depth(held) > 0, timeout=15)
    lose_broker_data(held)
    with worker_on(held, tmp_path / "held-worker.log"):
        report = maintenance.sweep()
        assert report.broker_reset and report.chains_resumed >= 1, report
        body = wait_chain(live_client, live_org, ce, timeout=20)
    assert body["status"] == "succeeded" and body["output"] == {"value": 3}
    assert [(r.chain_step, r.status, r.attempt) for r in step_rows(ce)] == [
        (0, "succeeded", 1),
        (1, "succeeded", 1),
    ]


def test_the_resume_check_leaves_a_chain_it_just_resumed_alone(live_client, live_org):
    held = f"stalled-{RUN_ID}"
    adder(live_client, live_org)
    # No worker serves this queue: the second step's message waits, as behind a backlog.
    adder(live_client, live_org, "held-adder", queue=held)
    chain(
        live_client,
        live_org,
        [{"name": "first", "agent": "adder"}, {"name": "next", "agent": "held-adder"}],
    )
    ce = uuid.UUID(run(live_client, live_org, {"value": 1}))
    wait_until(lambda: len(step_rows(ce)) == 1 and step_rows(ce)[0].status == "succeeded", 15)
    time.sleep(0.3)
    try:
        assert ce in progress.resume_stalled(grace_seconds=0.2)
        # Within the grace period the same chain is not published again ...
        assert ce not in progress.resume_stalled(grace_seconds=0.2)
        assert ce not in progress.resume_stalled(grace_seconds=0.2, batch=1)
        time.sleep(0.3)
        # ... after it, it is (still nothing under way).
        assert ce in progress.resume_stalled(grace_seconds=0.2)
    finally:
        live_client.post(f"/api/v1/chain-executions/{ce}/cancel", headers=live_org.headers)


def test_cancelling_a_step_through_the_executions_api_moves_the_chain_on(live_client, live_org):
    adder(live_client, live_org)
    agent(
        live_client,
        live_org,
        "flaky",
        "tests.agents:flaky",
        # Its retry waits long: the step sits queued, with no worker holding it, when cancelled.
        retry={"max_retries": 3, "backoff_seconds": 60, "jitter": False},
    )
    chain(
        live_client,
        live_org,
        [
            {"name": "shaky", "agent": "flaky", "input": {"succeed_on": 3}},
            {"name": "after", "agent": "adder", "input": {"value": 1}},
        ],
        on_failure="continue",
    )
    ce = run(live_client, live_org, {"value": 1})
    wait_until(
        lambda: [(r.status, r.attempt) for r in step_rows(ce)] == [("queued", 1)], timeout=15
    )
    shaky = steps_of(read(live_client, live_org, ce))[("step", "shaky")]["execution_id"]
    response = live_client.post(f"/api/v1/executions/{shaky}/cancel", headers=live_org.headers)
    assert response.status_code == 202, response.get_json()
    # Promptly, not at the next resume check (a minute) or when the retry message arrives.
    body = wait_chain(live_client, live_org, ce, timeout=10)
    assert [s["status"] for s in body["steps"]] == ["cancelled", "succeeded"]
    assert body["status"] == "failed" and "'shaky'" in body["error"]["message"]


def test_the_sweeper_moves_the_chain_of_a_lost_step_on(live_client, live_org):
    """A step whose worker vanished on its last attempt is failed `lost` by the sweeper, which
    then moves its chain on (here: stops it) instead of leaving it to the resume check."""
    adder(live_client, live_org)
    agent(live_client, live_org, "waiter", "tests.agents:wait_for_cancel")
    chain(
        live_client,
        live_org,
        [
            {"name": "wait", "agent": "waiter", "input": {"seconds": 3}},
            {"name": "after", "agent": "adder", "input": {"value": 1}},
        ],
    )
    ce = run(live_client, live_org, {"value": 1})
    wait_until(lambda: [r.status for r in step_rows(ce)] == ["running"], timeout=15)
    with db.hot() as conn:
        # As if its worker died: the lease runs out while the row still says running.
        conn.execute(
            text(
                "UPDATE executions SET lease_until = now() - interval '1 second' "
                "WHERE chain_execution_id = :id"
            ),
            {"id": ce},
        )
    maintenance.sweep()
    body = read(live_client, live_org, ce)
    assert body["status"] == "failed", body
    assert steps_of(body)[("step", "wait")]["status"] == "failed"
    assert steps_of(body)[("step", "after")]["status"] == "skipped"


def test_a_step_whose_input_is_not_an_object_fails_and_says_why(live_client, live_org):
    # The output declares `echo.value` but not its type: creation cannot rule a scalar out.
    echoes = {"type": "object", "required": ["value"], "properties": {"value": {}}}
    agent(
        live_client,
        live_org,
        "echoer",
        "tests.agents:echo",
        output_schema={"type": "object", "required": ["echo"], "properties": {"echo": echoes}},
    )
    chain(
        live_client,
        live_org,
        [
            {"name": "e", "agent": "echoer"},
            {"name": "scalar", "agent": "echoer", "input": "$.steps.e.output.echo.value"},
        ],
        on_failure="continue",
    )
    ce = run(live_client, live_org, {"value": 1})
    body = wait_chain(live_client, live_org, ce)
    assert [s["status"] for s in body["steps"]] == ["succeeded", "failed"]
    scalar = live_client.get(
        f"/api/v1/executions/{body['steps'][1]['execution_id']}", headers=live_org.headers
    ).get_json()
    assert scalar["error"]["type"] == "input_invalid" and scalar["attempts"] == 0
    assert "'scalar'" in scalar["error"]["message"]
    assert "JSON integer, not an object" in scalar["error"]["message"]
    assert scalar["error"]["hint"]


def test_under_continue_a_failed_steps_output_reads_as_absent(live_client, live_org):
    adder(live_client, live_org)
    agent(live_client, live_org, "echoer", "tests.agents:echo")
    agent(live_client, live_org, "boom", "tests.agents:boom")
    chain(
        live_client,
        live_org,
        [
            {
                "name": "fan",
                "parallel": [
                    {"name": "ok", "agent": "adder"},
                    {"name": "bad", "agent": "boom"},
                ],
            },
            {"name": "after", "agent": "echoer"},
            {
                "name": "tail",
                "parallel": [
                    {"name": "t1", "agent": "adder", "input": {"value": 1}},
                    {"name": "t2", "agent": "boom"},
                ],
            },
        ],
        on_failure="continue",
    )
    ce = run(live_client, live_org, {"value": 1})
    body = wait_chain(live_client, live_org, ce)
    assert body["status"] == "failed", body
    rows = {(r.chain_role, r.chain_step): r for r in step_rows(ce)}
    assert rows[("step", 2)].input == {"ok": {"value": 2}}, "no `bad` key, not a null"
    assert body["output"] == {"t1": {"value": 2}}


def test_a_step_of_an_agent_archived_mid_chain_fails_with_a_hint(live_client, live_org):
    agent(live_client, live_org, "sleepy", "tests.agents:sleepy")
    agent(live_client, live_org, "echoer", "tests.agents:echo")
    agent(live_client, live_org, "echoer2", "tests.agents:echo")
    chain(
        live_client,
        live_org,
        [
            {"name": "nap", "agent": "sleepy", "input": {"seconds": 1.0}},
            {"name": "plain", "agent": "echoer"},
            {"name": "mapped", "agent": "echoer2", "input": {"x": 1}},
        ],
        on_failure="continue",
    )
    ce = run(live_client, live_org, {"value": 1})
    wait_until(lambda: [r.status for r in step_rows(ce)] == ["running"], timeout=15)
    for name in ("echoer", "echoer2"):
        assert (
            live_client.delete(f"/api/v1/agents/{name}", headers=live_org.headers).status_code
            == 204
        )
    body = wait_chain(live_client, live_org, ce)
    assert [s["status"] for s in body["steps"]] == ["succeeded", "failed", "failed"]
    for step in body["steps"][1:]:
        refused = live_client.get(
            f"/api/v1/executions/{step['execution_id']}", headers=live_org.headers
        ).get_json()
        assert refused["error"]["type"] == "agent_archived" and refused["attempts"] == 0
        assert f"'{step['name']}'" in refused["error"]["message"]
        assert "archived" in refused["error"]["message"] and refused["error"]["hint"]
