"""Executions run end to end: HTTP submit, a real Celery worker, results and logs in PostgreSQL."""

import os
import time

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.worker


def define(client, org, name, runtime, **extra):
    body = {"name": name, "runtime": runtime, **extra}
    response = client.post("/api/v1/agents", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def python_agent(client, org, name, function, **extra):
    return define(
        client, org, name, {"type": "python", "entrypoint": f"tests.agents:{function}"}, **extra
    )


def script_agent(client, org, name, source, **extra):
    return define(
        client, org, name, {"type": "script", "language": "python", "source": source}, **extra
    )


def run(client, org, agent, payload=None, **extra):
    response = client.post(
        f"/api/v1/agents/{agent}/executions",
        json={"input": payload or {}, **extra},
        headers=org.headers,
    )
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def logs(client, org, execution_id, query=""):
    response = client.get(f"/api/v1/executions/{execution_id}/logs{query}", headers=org.headers)
    assert response.status_code == 200
    return response.get_json()


def test_python_agent_succeeds_with_its_ctx(live_client, live_org):
    python_agent(live_client, live_org, "echo", "echo", config={"greeting": "hello"})
    result = wait_for(live_client, live_org, run(live_client, live_org, "echo", {"a": 1}))
    assert result["status"] == "succeeded", result
    assert result["output"] == {
        "echo": {"a": 1},
        "attempt": 1,
        "agent": {"name": "echo", "version": "1.0.0"},
        "config": {"greeting": "hello"},
    }
    assert result["attempts"] == 1 and result["error"] is None
    assert result["started_at"] and result["finished_at"] and result["duration_ms"] >= 0
    usage = result["resource_usage"]
    assert set(usage) == {"cpu_seconds", "max_rss_mb", "wall_ms"}
    assert usage["max_rss_mb"] > 0


def test_prints_and_ctx_log_land_in_order(live_client, live_org):
    python_agent(live_client, live_org, "chatty", "chatty")
    execution_id = run(live_client, live_org, "chatty")
    assert wait_for(live_client, live_org, execution_id)["status"] == "succeeded"
    lines = logs(live_client, live_org, execution_id)
    assert [(line["level"], line["message"]) for line in lines] == [
        ("info", "first printed"),
        ("info", "then logged"),
        ("info", "then printed again"),
        ("warning", "a warning"),
        ("debug", "a debug line"),
    ]
    assert [line["seq"] for line in lines] == [1, 2, 3, 4, 5]
    assert lines[1]["fields"] == {"step": 2}
    assert [
        line["message"] for line in logs(live_client, live_org, execution_id, "?level=warning")
    ] == ["a warning"]


SCRIPT = """
import sys

def main(input, ctx):
    print("hello from the script")
    print("to stderr", file=sys.stderr)
    ctx.log.info("structured", n=input["n"])
    return {"double": input["n"] * 2, "agent": ctx.agent["name"], "config": ctx.config}
"""


def test_script_agent_runs_in_a_child_process(live_client, live_org):
    script_agent(live_client, live_org, "doubler", SCRIPT, config={"k": "v"})
    execution_id = run(live_client, live_org, "doubler", {"n": 21})
    result = wait_for(live_client, live_org, execution_id)
    assert result["status"] == "succeeded", result
    assert result["output"] == {"double": 42, "agent": "doubler", "config": {"k": "v"}}
    lines = {(line["level"], line["message"]) for line in logs(live_client, live_org, execution_id)}
    assert ("info", "hello from the script") in lines
    assert ("warning", "to stderr") in lines
    assert ("info", "structured") in lines
    assert result["resource_usage"]["cpu_seconds"] > 0


def test_script_sees_no_worker_secrets(live_client, live_org):
    source = "import os\ndef main(input, ctx):\n    return {'env': sorted(os.environ)}\n"
    script_agent(live_client, live_org, "env", source)
    result = wait_for(live_client, live_org, run(live_client, live_org, "env"))
    assert "DATABASE_URL" not in result["output"]["env"]
    assert "REDIS_URL" not in result["output"]["env"]


def test_exception_is_runtime_error_with_traceback_in_logs(live_client, live_org):
    python_agent(live_client, live_org, "boom", "boom")
    execution_id = run(live_client, live_org, "boom")
    result = wait_for(live_client, live_org, execution_id)
    assert result["status"] == "failed"
    assert result["error"]["type"] == "runtime_error"
    assert result["error"]["message"] == "RuntimeError: the agent blew up"
    assert result["error"]["hint"]
    errors = logs(live_client, live_org, execution_id, "?level=error")
    assert "Traceback" in errors[0]["message"] and "blew up" in errors[0]["message"]


def test_script_exception_and_missing_main(live_client, live_org):
    script_agent(live_client, live_org, "raiser", "def main(input, ctx):\n    1 / 0\n")
    result = wait_for(live_client, live_org, run(live_client, live_org, "raiser"))
    assert result["status"] == "failed"
    assert result["error"]["message"] == "ZeroDivisionError: division by zero"
    script_agent(live_client, live_org, "no-main", "x = 1\n")
    result = wait_for(live_client, live_org, run(live_client, live_org, "no-main"))
    assert result["error"]["type"] == "runtime_error" and "main" in result["error"]["message"]


@pytest.mark.parametrize(
    ("function", "fragment"),
    [("not_an_object", "not a JSON object"), ("wrong_output", "/count")],
)
def test_output_that_breaks_the_schema_is_output_invalid(live_client, live_org, function, fragment):
    python_agent(
        live_client,
        live_org,
        "bad-output",
        function,
        output_schema={"type": "object", "properties": {"count": {"type": "integer"}}},
        retry={"max_retries": 3, "backoff_seconds": 0},
    )
    result = wait_for(live_client, live_org, run(live_client, live_org, "bad-output"))
    assert result["status"] == "failed"
    assert result["error"]["type"] == "output_invalid"
    assert fragment in result["error"]["message"]
    assert result["attempts"] == 1, "output_invalid never retries"


def test_unloadable_entrypoint_is_runtime_error(live_client, live_org):
    define(
        live_client,
        live_org,
        "ghost",
        {"type": "python", "entrypoint": "tests.agents:does_not_exist"},
    )
    result = wait_for(live_client, live_org, run(live_client, live_org, "ghost"))
    assert result["error"]["type"] == "runtime_error"
    assert "cannot load" in result["error"]["message"]


def test_script_timeout_kills_it(live_client, live_org):
    source = "import time\ndef main(input, ctx):\n    time.sleep(30)\n    return {}\n"
    script_agent(live_client, live_org, "slow-script", source, timeout_seconds=1)
    started = time.monotonic()
    result = wait_for(live_client, live_org, run(live_client, live_org, "slow-script"))
    assert result["status"] == "timed_out"
    assert result["error"]["type"] == "timeout"
    assert time.monotonic() - started < 10


def test_python_timeout_is_timed_out(live_client, live_org):
    python_agent(live_client, live_org, "sleepy", "sleepy", timeout_seconds=1)
    result = wait_for(live_client, live_org, run(live_client, live_org, "sleepy", {"seconds": 5}))
    assert result["status"] == "timed_out"
    assert result["error"]["type"] == "timeout"


def _wait_running(client, org, execution_id):
    deadline = time.monotonic() + 10
    while (
        client.get(f"/api/v1/executions/{execution_id}", headers=org.headers).get_json()["status"]
        != "running"
    ):
        assert time.monotonic() < deadline, "never started"
        time.sleep(0.05)


def test_cancel_a_running_python_agent(live_client, live_org):
    python_agent(live_client, live_org, "waiter", "wait_for_cancel")
    execution_id = run(live_client, live_org, "waiter", {"seconds": 20})
    _wait_running(live_client, live_org, execution_id)
    response = live_client.post(
        f"/api/v1/executions/{execution_id}/cancel", headers=live_org.headers
    )
    assert response.status_code == 202
    result = wait_for(live_client, live_org, execution_id, timeout=10)
    assert result["status"] == "cancelled"
    assert result["error"]["type"] == "cancelled"
    assert "saw the cancel" in [
        line["message"] for line in logs(live_client, live_org, execution_id)
    ]


def test_cancel_a_running_script_stops_it_within_two_seconds(live_client, live_org):
    source = "import time\ndef main(input, ctx):\n    time.sleep(30)\n    return {}\n"
    script_agent(live_client, live_org, "long-script", source, timeout_seconds=60)
    execution_id = run(live_client, live_org, "long-script")
    _wait_running(live_client, live_org, execution_id)
    asked = time.monotonic()
    live_client.post(f"/api/v1/executions/{execution_id}/cancel", headers=live_org.headers)
    result = wait_for(live_client, live_org, execution_id, timeout=10)
    assert result["status"] == "cancelled"
    assert time.monotonic() - asked < 2.5


def test_transient_failures_are_retried(live_client, live_org):
    python_agent(
        live_client,
        live_org,
        "flaky",
        "flaky",
        retry={"max_retries": 2, "backoff_seconds": 0.1, "jitter": False},
    )
    execution_id = run(live_client, live_org, "flaky", {"succeed_on": 3})
    result = wait_for(live_client, live_org, execution_id)
    assert result["status"] == "succeeded", result
    assert result["output"] == {"attempt": 3} and result["attempts"] == 3
    attempts = {line["attempt"] for line in logs(live_client, live_org, execution_id)}
    assert attempts == {1, 2}, "the failed attempts' tracebacks stay in the logs"


def test_retries_run_out(live_client, live_org):
    python_agent(
        live_client, live_org, "flaky", "flaky", retry={"max_retries": 1, "backoff_seconds": 0}
    )
    result = wait_for(live_client, live_org, run(live_client, live_org, "flaky", {"succeed_on": 5}))
    assert result["status"] == "failed" and result["attempts"] == 2
    assert "attempt 2" in result["error"]["message"]


def test_example_agents_run(live_client, live_org):
    from runyard_examples import AGENTS

    for definition in AGENTS:
        response = live_client.post("/api/v1/agents", json=definition, headers=live_org.headers)
        assert response.status_code == 201, response.get_json()
    inputs = {
        "summarize-ticket": {"text": "The printer is on fire. Please help. It is urgent."},
        "word-count": {"text": "the cat and the hat"},
        "slugify": {"title": "Hello, Runyard!"},
        "invoice-total": {"lines": [{"quantity": 2, "unit_price": 3.5}], "tax_rate": 0.2},
    }
    ids = {name: run(live_client, live_org, name, payload) for name, payload in inputs.items()}
    outputs = {name: wait_for(live_client, live_org, i)["output"] for name, i in ids.items()}
    assert outputs["slugify"] == {"slug": "hello-runyard"}
    assert outputs["invoice-total"] == {"subtotal": 7.0, "tax": 1.4, "total": 8.4}
    assert outputs["word-count"]["words"] == 5
    assert outputs["summarize-ticket"]["summary"] == "The printer is on fire. Please help."


def test_script_output_is_in_order_and_usage_is_the_childs_own(live_client, live_org):
    source = (
        "import sys\n"
        "def main(input, ctx):\n"
        "    print('one')\n"
        "    print('two', file=sys.stderr)\n"
        "    ctx.log.info('three')\n"
        "    print('four')\n"
        "    return {}\n"
    )
    script_agent(live_client, live_org, "ordered", source)
    execution_id = run(live_client, live_org, "ordered")
    result = wait_for(live_client, live_org, execution_id)
    assert [line["message"] for line in logs(live_client, live_org, execution_id)] == [
        "one",
        "two",
        "three",
        "four",
    ]
    # A bare interpreter, not the worker's (larger) pool process that forked it.
    assert result["resource_usage"]["max_rss_mb"] < 60


def test_nul_characters_neither_break_logs_nor_reach_the_output(live_client, live_org):
    source = "def main(input, ctx):\n    print('a\\x00b')\n    return {'ok': True}\n"
    script_agent(live_client, live_org, "nul-log", source)
    execution_id = run(live_client, live_org, "nul-log")
    assert wait_for(live_client, live_org, execution_id)["status"] == "succeeded"
    assert logs(live_client, live_org, execution_id)[0]["message"] == "a\\x00b"
    source = "def main(input, ctx):\n    return {'text': 'a\\x00b'}\n"
    script_agent(live_client, live_org, "nul-output", source)
    result = wait_for(live_client, live_org, run(live_client, live_org, "nul-output"))
    assert result["status"] == "failed" and result["error"]["type"] == "output_invalid"


def test_an_output_with_integer_keys_is_stored_as_json_writes_it(live_client, live_org):
    created = live_client.post(
        "/api/v1/agents",
        json={
            "name": "integer-keys",
            "runtime": {"type": "python", "entrypoint": "tests.agents:integer_keys"},
        },
        headers=live_org.headers,
    )
    assert created.status_code == 201, created.get_json()
    result = wait_for(live_client, live_org, run(live_client, live_org, "integer-keys"))
    assert result["status"] == "succeeded", result
    assert result["output"] == {"counts": {"1": 5, "2": 7}}


def test_unpaired_surrogates_in_logs_are_written_out_not_fatal(live_client, live_org):
    source = (
        "def main(input, ctx):\n"
        "    ctx.log.info('a\\ud800b', **{'k\\udc00': 'v\\ud800', 'ok': '\U0001f600'})\n"
        "    return {'ok': True}\n"
    )
    script_agent(live_client, live_org, "surrogate-log", source)
    execution_id = run(live_client, live_org, "surrogate-log")
    assert wait_for(live_client, live_org, execution_id)["status"] == "succeeded"
    line = logs(live_client, live_org, execution_id)[0]
    assert line["message"] == "a\\ud800b"
    assert line["fields"] == {"k\\udc00": "v\\ud800", "ok": "\U0001f600"}


def test_a_script_writing_on_the_control_channel_cannot_break_the_worker(live_client, live_org):
    source = (
        "import os\n"
        "def main(input, ctx):\n"
        "    os.write(int(os.environ['RUNYARD_CONTROL_FD']), b'garbage\\n')\n"
        "    return {'ok': True}\n"
    )
    script_agent(live_client, live_org, "scribbler", source)
    execution_id = run(live_client, live_org, "scribbler")
    result = wait_for(live_client, live_org, execution_id)
    assert result["status"] == "succeeded" and result["output"] == {"ok": True}
    assert "garbage" in [line["message"] for line in logs(live_client, live_org, execution_id)]


def test_what_a_script_leaves_running_is_killed_when_it_returns(live_client, live_org):
    source = (
        "import subprocess\n"
        "def main(input, ctx):\n"
        "    child = subprocess.Popen(['sleep', '30'])\n"
        "    return {'pid': child.pid}\n"
    )
    script_agent(live_client, live_org, "leaver", source, timeout_seconds=20)
    started = time.monotonic()
    result = wait_for(live_client, live_org, run(live_client, live_org, "leaver"))
    assert result["status"] == "succeeded", result["error"]
    assert time.monotonic() - started < 10, "the background child must not hold the run open"
    pid = result["output"]["pid"]
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the script's background process was left behind"
