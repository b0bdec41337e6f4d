"""Durable agents with real workers and a real beat: children, gathering, sleeps, replay,
nondeterminism, cancel cascades, bounds, and the execution token of command agents."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from sqlalchemy import text

from app.db import db
from tests.app.test_events_live import api  # noqa: F401 (a live `runyard api`)
from tests.beat import BeatProcess
from tests.conftest import RUN_ID, bearer, celery_worker, wait_for, wait_until
from tests.workers.test_runs import define, python_agent, run, script_agent

pytestmark = pytest.mark.worker

TERMINAL = ("succeeded", "failed", "timed_out", "cancelled")


@pytest.fixture(scope="module")
def beat(app, tmp_path_factory):
    """Beat wakes due sleeps and timed-out event waits."""
    process = BeatProcess(tmp_path_factory.mktemp("durable-beat"), "beat")
    process.wait_ready()
    yield process
    process.stop()


def get(client, org, execution_id):
    return client.get(f"/api/v1/executions/{execution_id}", headers=org.headers).get_json()


def journal(client, org, execution_id):
    response = client.get(f"/api/v1/executions/{execution_id}/journal", headers=org.headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def status_of(execution_id) -> str:
    with db.hot() as conn:
        return conn.execute(
            text("SELECT status FROM executions WHERE id = :id"), {"id": execution_id}
        ).scalar_one()


# ---------------------------------------------------------------------------------------------
# Children


def test_a_parent_gathers_ten_children_on_a_worker_of_concurrency_one(
    live_client, live_org, tmp_path
):
    """The parent holds no worker process while it waits: with a single one, its children run
    in it and the parent resumes after them (a blocking parent would deadlock the pool)."""
    queue = f"durable-c1-{RUN_ID}"
    python_agent(live_client, live_org, "double", "double", queue=queue)
    python_agent(live_client, live_org, "fan", "fan_out", queue=queue)
    with celery_worker(tmp_path / "c1.log", queues=queue, concurrency=1, name="c1"):
        execution_id = run(live_client, live_org, "fan", {"child": "double", "count": 10})
        result = wait_for(live_client, live_org, execution_id, timeout=60)
    assert result["status"] == "succeeded", result
    assert result["output"] == {"total": 90, "children": 10}
    assert result["attempts"] == 1  # resumes are not retries
    assert len(result["children"]) == 10
    child = get(live_client, live_org, result["children"][3])
    assert child["parent_execution_id"] == execution_id
    assert child["output"] == {"n": 6}
    entries = journal(live_client, live_org, execution_id)
    assert [entry["seq"] for entry in entries] == list(range(1, 11))
    assert {entry["kind"] for entry in entries} == {"child"}
    assert all(entry["status"] == "succeeded" for entry in entries)
    assert entries[3]["result"]["output"] == {"n": 6}
    assert entries[3]["child_execution_id"] == result["children"][3]


def test_a_failed_child_reaches_its_parent_as_child_failed(live_client, live_org):
    python_agent(live_client, live_org, "boom", "boom")
    python_agent(live_client, live_org, "runner", "run_child")
    caught = run(live_client, live_org, "runner", {"child": "boom", "catch": True})
    result = wait_for(live_client, live_org, caught, timeout=30)
    assert result["status"] == "succeeded", result
    failed = result["output"]["failed"]
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "runtime_error"
    assert "the agent blew up" in failed["error"]["message"]
    assert failed["error"]["hint"]
    uncaught = run(live_client, live_org, "runner", {"child": "boom"})
    result = wait_for(live_client, live_org, uncaught, timeout=30)
    assert result["status"] == "failed"
    assert "ChildFailed" in result["error"]["message"]
    assert "the agent blew up" in result["error"]["message"]


def test_a_child_refused_fails_the_parent_with_the_reason(live_client, live_org):
    python_agent(live_client, live_org, "runner", "run_child")
    execution_id = run(live_client, live_org, "runner", {"child": "no-such-agent"})
    result = wait_for(live_client, live_org, execution_id, timeout=30)
    assert result["status"] == "failed"
    assert "no agent 'no-such-agent'" in result["error"]["message"]
    define(
        live_client,
        live_org,
        "strict",
        {"type": "python", "entrypoint": "tests.agents:double"},
        input_schema={"type": "object", "required": ["n"]},
    )
    execution_id = run(live_client, live_org, "runner", {"child": "strict", "input": {}})
    result = wait_for(live_client, live_org, execution_id, timeout=30)
    assert result["status"] == "failed"
    assert "the input is refused" in result["error"]["message"]


RECURSIVE = """
def main(input, ctx):
    if input["left"] == 0:
        return {"depth": 0}
    return {"depth": 1 + ctx.run("recursive", {"left": input["left"] - 1})["depth"]}
"""


def test_children_nest_ten_deep_and_no_deeper(live_client, live_org):
    script_agent(live_client, live_org, "recursive", RECURSIVE)
    ten = run(live_client, live_org, "recursive", {"left": 10})
    result = wait_for(live_client, live_org, ten, timeout=90)
    assert result["status"] == "succeeded", result
    assert result["output"] == {"depth": 10}
    eleven = run(live_client, live_org, "recursive", {"left": 11})
    result = wait_for(live_client, live_org, eleven, timeout=90)
    assert result["status"] == "failed"
    assert "executions nest at most 10 deep" in result["error"]["message"]


WAITS_ON_A_SLEEPER = """
def main(input, ctx):
    ctx.run("sleepy", {"seconds": 30})
    return {}
"""


def test_cancelling_a_waiting_parent_cancels_its_running_child(live_client, live_org):
    python_agent(live_client, live_org, "sleepy", "wait_for_cancel")
    script_agent(live_client, live_org, "parent", WAITS_ON_A_SLEEPER)
    parent = run(live_client, live_org, "parent", {})
    wait_until(lambda: get(live_client, live_org, parent)["status"] == "waiting", timeout=20)
    (child,) = get(live_client, live_org, parent)["children"]
    wait_until(lambda: get(live_client, live_org, child)["status"] == "running", timeout=20)
    response = live_client.post(f"/api/v1/executions/{parent}/cancel", headers=live_org.headers)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["status"] == "cancelled"
    assert wait_for(live_client, live_org, child, timeout=20)["status"] == "cancelled"
    # The child's end does not bring the cancelled parent back.
    time.sleep(1)
    assert get(live_client, live_org, parent)["status"] == "cancelled"


# ---------------------------------------------------------------------------------------------
# Steps, sleeps, replay


def test_a_sleep_holds_no_worker_and_resumes_from_the_journal(live_client, live_org, beat):
    python_agent(live_client, live_org, "sleeper", "sleeper")
    execution_id = run(live_client, live_org, "sleeper", {"seconds": 2})
    wait_until(lambda: get(live_client, live_org, execution_id)["status"] == "waiting", timeout=20)
    with db.hot() as conn:
        lease, wake_at = conn.execute(
            text("SELECT lease_until, wake_at FROM executions WHERE id = :id"),
            {"id": execution_id},
        ).one()
    assert lease is None and wake_at is not None
    result = wait_for(live_client, live_org, execution_id, timeout=30)
    assert result["status"] == "succeeded", result
    # The step recorded before the sleep answered the replay: `before` is the first run's.
    assert result["output"]["slept"] >= 2
    kinds = [
        (entry["kind"], entry["name"], entry["status"])
        for entry in journal(live_client, live_org, execution_id)
    ]
    assert kinds == [("step", "before", "done"), ("sleep", "sleep", "done")]


def test_a_sleep_shorter_than_a_second_is_refused(live_client, live_org):
    script_agent(
        live_client, live_org, "quick", "def main(input, ctx):\n    ctx.sleep(0.1)\n    return {}"
    )
    result = wait_for(live_client, live_org, run(live_client, live_org, "quick", {}))
    assert result["status"] == "failed"
    assert "at least 1 s" in result["error"]["message"]


def test_a_replay_that_asks_for_other_calls_fails_as_nondeterministic(
    live_client, live_org, beat, tmp_path
):
    python_agent(live_client, live_org, "double", "double")
    python_agent(live_client, live_org, "fickle", "changes_its_calls", retry={"max_retries": 2})
    execution_id = run(live_client, live_org, "fickle", {"marker": str(tmp_path / "m")})
    result = wait_for(live_client, live_org, execution_id, timeout=30)
    assert result["status"] == "failed"
    assert result["error"]["type"] == "nondeterministic"
    assert "durable call #1" in result["error"]["message"]
    assert "child 'double'" in result["error"]["message"]
    assert "step 'first'" in result["error"]["message"]
    assert "same order" in result["error"]["hint"]
    assert result["attempts"] == 1  # never retried: it would differ again


def test_a_retry_replays_the_steps_a_failed_attempt_recorded(live_client, live_org, tmp_path):
    ledger = tmp_path / "ledger.txt"
    source = (
        "def main(input, ctx):\n"
        "    def write(line):\n"
        "        with open(input['path'], 'a') as f:\n"
        "            f.write(line + '\\n')\n"
        "        return line\n"
        "    ctx.step('one', write, 'one')\n"
        "    if ctx.attempt == 1:\n"
        "        raise ConnectionError('transient')\n"
        "    ctx.step('two', write, 'two')\n"
        "    return {'attempt': ctx.attempt}\n"
    )
    script_agent(
        live_client,
        live_org,
        "retrying",
        source,
        retry={"max_retries": 1, "backoff_seconds": 0.1, "jitter": False},
    )
    result = wait_for(
        live_client, live_org, run(live_client, live_org, "retrying", {"path": str(ledger)})
    )
    assert result["status"] == "succeeded", result
    assert result["output"] == {"attempt": 2}
    assert ledger.read_text().splitlines() == ["one", "two"]


# ---------------------------------------------------------------------------------------------
# The execution token: command agents reach the same over REST

COMMAND_PARENT = r"""
import json, os, sys, time, urllib.request
api, token = os.environ["RUNYARD_API_URL"], os.environ["RUNYARD_EXECUTION_TOKEN"]
def call(method, path, body=None):
    request = urllib.request.Request(api + "/api/v1" + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.load(response)
child = call("POST", "/agents/double/executions", {"input": {"n": 21}})
while child["status"] not in ("succeeded", "failed", "timed_out", "cancelled"):
    time.sleep(0.1)
    child = call("GET", "/executions/" + child["id"])
json.dump({"child": child["id"], "output": child["output"], "token": token},
          open(os.environ["RUNYARD_OUTPUT_PATH"], "w"))
"""


@pytest.fixture
def api_server(api):  # noqa: F811
    host, port = api
    return f"http://{host}:{port}"


def test_a_command_agent_starts_a_child_with_its_execution_token(
    live_client, live_org, api_server, tmp_path
):
    python_agent(live_client, live_org, "double", "double")
    queue = f"durable-token-{RUN_ID}"
    define(
        live_client,
        live_org,
        "commander",
        {"type": "command", "argv": ["python3", "-c", COMMAND_PARENT]},
        queue=queue,
    )
    with celery_worker(
        tmp_path / "token.log", queues=queue, name="token", env={"RUNYARD_API_URL": api_server}
    ):
        execution_id = run(live_client, live_org, "commander", {})
        result = wait_for(live_client, live_org, execution_id, timeout=60)
    assert result["status"] == "succeeded", result
    output = result["output"]
    assert output["output"] == {"n": 42}
    assert result["children"] == [output["child"]]
    assert get(live_client, live_org, output["child"])["parent_execution_id"] == execution_id
    (entry,) = journal(live_client, live_org, execution_id)
    assert (entry["kind"], entry["name"], entry["status"]) == ("child", "double", "succeeded")
    # The token expired with its execution.
    response = live_client.get("/api/v1/agents", headers=bearer(output["token"]))
    assert response.status_code == 401
    assert "execution token" in response.get_json()["message"]


def test_an_execution_token_is_not_an_admin(live_client, live_org):
    """What the token may not do (it starts no agents' definitions, reads no audit trail) and
    that a made-up one is refused."""
    response = live_client.get("/api/v1/agents", headers=bearer("rye_" + uuid.uuid4().hex))
    assert response.status_code == 401
    assert "hint" in response.get_json()


def test_the_journal_of_another_organization_is_a_404(live_client, live_org, other_live_org):
    python_agent(live_client, live_org, "double", "double")
    execution_id = run(live_client, live_org, "double", {"n": 1})
    response = live_client.get(
        f"/api/v1/executions/{execution_id}/journal", headers=other_live_org.headers
    )
    assert response.status_code == 404
    assert json.loads(response.data)["hint"]


# ---------------------------------------------------------------------------------------------
# State from agents

STATE_SCRIPT = """
def main(input, ctx):
    before = ctx.state.get("greeting", "none")
    version = ctx.state.set("greeting", input["say"])
    try:
        ctx.state.set("greeting", "never", expected_version=version + 5)
    except StateConflict:
        conflicted = True
    ctx.state.delete("scratch")
    return {"before": before, "version": version, "conflicted": conflicted,
            "entry": ctx.state.entry("greeting")}
"""


def test_agents_compare_and_set_their_state_under_concurrent_runs(live_client, live_org):
    python_agent(live_client, live_org, "counter", "counter")
    ids = [run(live_client, live_org, "counter", {}) for _ in range(12)]
    results = [wait_for(live_client, live_org, execution_id, timeout=60) for execution_id in ids]
    assert all(r["status"] == "succeeded" for r in results), results
    assert sorted(r["output"]["count"] for r in results) == list(range(1, 13))
    response = live_client.get("/api/v1/agents/counter/state/count", headers=live_org.headers)
    assert response.status_code == 200
    assert response.get_json()["value"] == 12 and response.headers["ETag"] == '"12"'


def test_a_script_agent_reads_and_writes_its_state(live_client, live_org):
    script_agent(live_client, live_org, "stateful", STATE_SCRIPT)
    first = wait_for(live_client, live_org, run(live_client, live_org, "stateful", {"say": "hi"}))
    assert first["status"] == "succeeded", first
    assert first["output"] == {
        "before": "none",
        "version": 1,
        "conflicted": True,
        "entry": {"value": "hi", "version": 1},
    }
    second = wait_for(live_client, live_org, run(live_client, live_org, "stateful", {"say": "yo"}))
    assert second["output"]["before"] == "hi" and second["output"]["version"] == 2


# ---------------------------------------------------------------------------------------------
# Events


def send(client, org, name, data, event_id=None):
    body = {"name": name, "data": data, **({"id": event_id} if event_id else {})}
    response = client.post("/api/v1/events", json=body, headers=org.headers)
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def wait_status(client, org, execution_id, status, timeout=20):
    wait_until(lambda: get(client, org, execution_id)["status"] == status, timeout=timeout)


def test_an_event_resumes_the_waits_it_matches_within_a_second(live_client, live_org):
    python_agent(live_client, live_org, "waiter", "waits_for_event")
    mine = run(live_client, live_org, "waiter", {"event": "order.paid", "match": {"order.id": 7}})
    other = run(live_client, live_org, "waiter", {"event": "order.paid", "match": {"order.id": 8}})
    for execution_id in (mine, other):
        wait_status(live_client, live_org, execution_id, "waiting")
    sent = time.monotonic()
    answer = send(live_client, live_org, "order.paid", {"order": {"id": 7}, "amount": 12})
    assert answer["resumed"] == [mine]
    result = wait_for(live_client, live_org, mine, timeout=10)
    assert time.monotonic() - sent < 1.5
    assert result["output"] == {"data": {"order": {"id": 7}, "amount": 12}}
    assert get(live_client, live_org, other)["status"] == "waiting"
    (entry,) = journal(live_client, live_org, mine)
    assert (entry["kind"], entry["name"], entry["status"]) == ("event", "order.paid", "received")
    # The same id again within 24 hours: accepted once, resumes nothing more.
    first = send(live_client, live_org, "order.paid", {"order": {"id": 8}}, event_id="pay-8")
    again = send(live_client, live_org, "order.paid", {"order": {"id": 8}}, event_id="pay-8")
    assert first["resumed"] == [other] and again["duplicate"] is True and again["resumed"] == []
    assert wait_for(live_client, live_org, other, timeout=10)["status"] == "succeeded"
    listed = live_client.get("/api/v1/events?name=order.paid", headers=live_org.headers)
    assert {tuple(e["resumed"]) for e in listed.get_json()} == {(mine,), (other,)}


def test_a_wait_looks_back_for_an_event_sent_before_it(live_client, live_org):
    python_agent(live_client, live_org, "waiter", "waits_for_event")
    send(live_client, live_org, "invoice.sent", {"invoice": "A-1"})
    blind = run(live_client, live_org, "waiter", {"event": "invoice.sent", "timeout": 60})
    looking = run(
        live_client,
        live_org,
        "waiter",
        {"event": "invoice.sent", "match": {"invoice": "A-1"}, "lookback": 60},
    )
    assert wait_for(live_client, live_org, looking, timeout=20)["output"] == {
        "data": {"invoice": "A-1"}
    }
    wait_status(live_client, live_org, blind, "waiting")


def test_a_wait_times_out_with_none(live_client, live_org, beat):
    python_agent(live_client, live_org, "waiter", "waits_for_event")
    execution_id = run(live_client, live_org, "waiter", {"event": "never.sent", "timeout": 2})
    result = wait_for(live_client, live_org, execution_id, timeout=30)
    assert result["status"] == "succeeded", result
    assert result["output"] == {"data": None}
    (entry,) = journal(live_client, live_org, execution_id)
    assert entry["status"] == "timed_out"
    # An event after the timeout finds no wait.
    assert send(live_client, live_org, "never.sent", {})["resumed"] == []


def test_an_event_of_one_organization_resumes_nothing_of_another(
    live_client, live_org, other_live_org
):
    python_agent(live_client, live_org, "waiter", "waits_for_event")
    execution_id = run(live_client, live_org, "waiter", {"event": "shared.name"})
    wait_status(live_client, live_org, execution_id, "waiting")
    assert send(live_client, other_live_org, "shared.name", {})["resumed"] == []
    time.sleep(0.5)
    assert get(live_client, live_org, execution_id)["status"] == "waiting"
    cancel = live_client.post(f"/api/v1/executions/{execution_id}/cancel", headers=live_org.headers)
    assert cancel.status_code == 202


def test_a_child_cancelled_over_the_api_wakes_its_parent_at_once(live_client, live_org):
    python_agent(live_client, live_org, "sleepy", "wait_for_cancel")
    python_agent(live_client, live_org, "runner", "run_child")
    parent = run(live_client, live_org, "runner", {"child": "sleepy", "catch": True})
    wait_status(live_client, live_org, parent, "waiting")
    (child,) = get(live_client, live_org, parent)["children"]
    cancelled = time.monotonic()
    response = live_client.post(f"/api/v1/executions/{child}/cancel", headers=live_org.headers)
    assert response.status_code == 202
    result = wait_for(live_client, live_org, parent, timeout=20)
    assert time.monotonic() - cancelled < 10  # not left for the sweeper's 30 s grace
    assert result["output"]["failed"]["status"] == "cancelled"


def test_a_durable_step_of_a_chain_waits_then_moves_its_chain_on(live_client, live_org, beat):
    """The canvas stops at a step that waits; the step resumes as a plain execution and its end
    carries the chain to the next step."""
    from tests.workers.test_chains_runs import wait_chain

    python_agent(live_client, live_org, "sleeper", "sleeper")
    python_agent(live_client, live_org, "echo", "echo")
    body = {
        "name": "nap",
        "steps": [
            {"name": "nap", "agent": "sleeper", "input": {"seconds": 1}},
            {"name": "after", "agent": "echo", "input": {"slept": "$.steps.nap.output.slept"}},
        ],
    }
    response = live_client.post("/api/v1/chains", json=body, headers=live_org.headers)
    assert response.status_code == 201, response.get_json()
    response = live_client.post(
        "/api/v1/chains/nap/executions", json={"input": {}}, headers=live_org.headers
    )
    assert response.status_code == 202, response.get_json()
    result = wait_chain(live_client, live_org, response.get_json()["id"], timeout=30)
    assert result["status"] == "succeeded", result
    after = next(step for step in result["steps"] if step["name"] == "after")
    assert get(live_client, live_org, after["execution_id"])["output"]["echo"]["slept"] >= 1


def test_a_run_cancelled_just_before_it_would_wait_ends_cancelled(live_client, live_org, beat):
    """A cancel asked while a durable run goes on ends it `cancelled`, whether the runtime
    stops it first or it reaches its wait first (the suspend reads the cancel under the row's
    lock and records it instead of waiting)."""
    script_agent(
        live_client,
        live_org,
        "late-sleeper",
        "import time\n"
        "def main(input, ctx):\n"
        "    time.sleep(1.5)\n"
        "    ctx.sleep(60)\n"
        "    return {}\n",
    )
    execution_id = run(live_client, live_org, "late-sleeper", {})
    wait_status(live_client, live_org, execution_id, "running")
    live_client.post(f"/api/v1/executions/{execution_id}/cancel", headers=live_org.headers)
    result = wait_for(live_client, live_org, execution_id, timeout=20)
    assert result["status"] == "cancelled", result


def test_a_step_that_raised_leaves_no_gap_in_the_journal(live_client, live_org, beat, tmp_path):
    """A failed step is not recorded and its number goes to the next call: tried again in the
    same run, the step and the calls after it replay in order."""
    python_agent(live_client, live_org, "retrier", "retries_a_step")
    execution_id = run(live_client, live_org, "retrier", {"marker": str(tmp_path / "m")})
    result = wait_for(live_client, live_org, execution_id, timeout=30)
    assert result["status"] == "succeeded", result
    assert result["output"] == {"value": "second try", "after": "done"}
    entries = [
        (e["seq"], e["kind"], e["name"]) for e in journal(live_client, live_org, execution_id)
    ]
    assert entries == [(1, "step", "flaky"), (2, "sleep", "sleep"), (3, "step", "after")]
