"""The command runtime, limits, timeouts, cancellation, retries and priority, through the public
API with real workers."""

import os
import time
import uuid

import pytest

from tests.brokers import queue_depth
from tests.conftest import celery_worker, wait_for, wait_until
from tests.workers.test_runs import define, logs, python_agent, run, script_agent

pytestmark = pytest.mark.worker


def command_agent(client, org, name, argv, **extra):
    return define(client, org, name, {"type": "command", "argv": argv}, **extra)


def py_command(code: str) -> list[str]:
    return ["python3", "-c", code]


def processes_with(marker: str) -> list[int]:
    """Pids whose command line holds `marker` (this test's own processes excluded)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                if marker.encode() in cmdline.read():
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def seconds_from_cancel_to_finish(execution_id: str) -> float:
    """Measured on the database's clock, so a slow test client does not count."""
    from sqlalchemy import text

    from app.db import db

    with db.hot() as conn:
        return conn.execute(
            text(
                "SELECT extract(epoch FROM finished_at - cancel_requested_at) "
                "FROM executions WHERE id = :id"
            ),
            {"id": execution_id},
        ).scalar_one()


# ---------------------------------------------------------------------------------------------
# command


def test_command_gets_stdin_writes_its_output_file_and_logs_both_streams(live_client, live_org):
    code = (
        "import json, os, sys\n"
        "data = json.load(sys.stdin)\n"
        "print('to stdout', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "out = {'doubled': data['n'] * 2, 'greeting': os.environ['GREETING'],\n"
        "       'id': os.environ['RUNYARD_EXECUTION_ID'], 'has_db': 'DATABASE_URL' in os.environ}\n"
        "json.dump(out, open(os.environ['RUNYARD_OUTPUT_PATH'], 'w'))\n"
    )
    define(
        live_client,
        live_org,
        "doubler",
        {"type": "command", "argv": py_command(code), "env": {"GREETING": "hi"}},
        output_schema={"type": "object", "required": ["doubled"]},
    )
    execution_id = run(live_client, live_org, "doubler", {"n": 21})
    result = wait_for(live_client, live_org, execution_id)
    assert result["status"] == "succeeded", result
    assert result["output"] == {
        "doubled": 42,
        "greeting": "hi",
        "id": execution_id,
        "has_db": False,
    }
    lines = [(line["level"], line["message"]) for line in logs(live_client, live_org, execution_id)]
    assert ("info", "to stdout") in lines and ("warning", "to stderr") in lines
    usage = result["resource_usage"]
    assert usage["cpu_seconds"] > 0 and usage["max_rss_mb"] > 0 and usage["wall_ms"] > 0


def test_command_exit_code_and_last_stderr_lines_make_a_runtime_error(live_client, live_org):
    code = "import sys\nfor n in range(8): print(f'problem {n}', file=sys.stderr)\nsys.exit(3)"
    command_agent(live_client, live_org, "exits-3", py_command(code))
    result = wait_for(live_client, live_org, run(live_client, live_org, "exits-3"))
    assert result["status"] == "failed"
    assert result["error"]["type"] == "runtime_error"
    message = result["error"]["message"]
    assert "exited with code 3" in message
    assert "problem 7" in message and "problem 3" in message and "problem 2" not in message


@pytest.mark.parametrize(
    ("code", "error_type", "fragment"),
    [
        ("pass", "runtime_error", "without writing its output"),
        (
            "import os; open(os.environ['RUNYARD_OUTPUT_PATH'], 'w').write('not json')",
            "output_invalid",
            "does not hold JSON",
        ),
        (
            "import os; open(os.environ['RUNYARD_OUTPUT_PATH'], 'w').write('[1, 2]')",
            "output_invalid",
            "not a JSON object",
        ),
    ],
)
def test_command_output_file_problems(live_client, live_org, code, error_type, fragment):
    name = f"out-{uuid.uuid4().hex[:6]}"
    command_agent(live_client, live_org, name, py_command(code))
    result = wait_for(live_client, live_org, run(live_client, live_org, name))
    assert result["status"] == "failed"
    assert result["error"]["type"] == error_type
    assert fragment in result["error"]["message"]


def test_command_outside_the_allow_list_is_refused_at_creation(live_client, live_org):
    response = live_client.post(
        "/api/v1/agents",
        json={"name": "rm", "runtime": {"type": "command", "argv": ["rm", "-rf", "/"]}},
        headers=live_org.headers,
    )
    assert response.status_code == 422
    body = response.get_json()
    assert "/runtime/argv/0" in body["errors"]
    assert "RUNYARD_ALLOWED_COMMANDS" in body["hint"]
    reserved = live_client.post(
        "/api/v1/agents",
        json={
            "name": "sneaky",
            "runtime": {
                "type": "command",
                "argv": ["python3"],
                "env": {"RUNYARD_OUTPUT_PATH": "/etc/passwd"},
                "cwd": "relative/dir",
            },
        },
        headers=live_org.headers,
    )
    assert reserved.status_code == 422
    assert set(reserved.get_json()["errors"]) >= {"/runtime/env", "/runtime/cwd"}


def test_the_agents_env_cannot_choose_which_program_an_allowed_name_runs(
    live_client, live_org, tmp_path
):
    fake = tmp_path / "sh"
    fake.write_text('#!/bin/sh\necho \'{"fake": true}\' > "$RUNYARD_OUTPUT_PATH"\n')
    fake.chmod(0o755)
    # Shell builtins only: the agent's PATH holds nothing but the fake.
    script = 'echo \'{"real": true}\' > "$RUNYARD_OUTPUT_PATH"'
    define(
        live_client,
        live_org,
        "pathed",
        {"type": "command", "argv": ["sh", "-c", script], "env": {"PATH": str(tmp_path)}},
    )
    result = wait_for(live_client, live_org, run(live_client, live_org, "pathed"))
    assert result["output"] == {"real": True}, result["error"]
    preload = live_client.post(
        "/api/v1/agents",
        json={
            "name": "preload",
            "runtime": {"type": "command", "argv": ["sh"], "env": {"LD_PRELOAD": "/tmp/x.so"}},
        },
        headers=live_org.headers,
    )
    assert preload.status_code == 422 and "/runtime/env" in preload.get_json()["errors"]


def test_a_command_that_never_reads_its_input_is_still_bounded(live_client, live_org):
    # 900 kB of input against a 64 kB pipe: the write must not hold up the timeout.
    command_agent(live_client, live_org, "deaf-cmd", ["sh", "-c", "sleep 30"], timeout_seconds=1)
    execution_id = run(live_client, live_org, "deaf-cmd", {"blob": "x" * 900_000})
    result = wait_for(live_client, live_org, execution_id)
    assert result["status"] == "timed_out"
    assert result["resource_usage"]["wall_ms"] < 5000


def test_a_process_that_leaves_the_group_does_not_hold_the_execution(live_client, live_org):
    code = (
        "import json, os, subprocess\n"
        "subprocess.Popen(['setsid', 'sleep', '20'])\n"
        "json.dump({}, open(os.environ['RUNYARD_OUTPUT_PATH'], 'w'))\n"
    )
    command_agent(live_client, live_org, "escapee", py_command(code), timeout_seconds=10)
    result = wait_for(live_client, live_org, run(live_client, live_org, "escapee"))
    assert result["status"] == "succeeded", result
    assert result["resource_usage"]["wall_ms"] < 5000


def test_a_missing_program_is_a_runtime_error(live_client, live_org):
    # `sh` is allowed; the program it is asked to exec is not there.
    command_agent(live_client, live_org, "missing", ["sh", "-c", "exec /no/such/program"])
    result = wait_for(live_client, live_org, run(live_client, live_org, "missing"))
    assert result["status"] == "failed"
    assert result["error"]["type"] == "runtime_error"
    assert "exited with code 127" in result["error"]["message"]


# ---------------------------------------------------------------------------------------------
# limits


GROW_MEMORY = (
    "import time\nheld = []\n"
    "for _ in range(400):\n"
    "    held.append(bytearray(4 * 1024 * 1024))\n"
    "    time.sleep(0.01)\n"
)


def test_memory_limit_stops_a_script(live_client, live_org):
    script_agent(
        live_client,
        live_org,
        "hog",
        f"def main(input, ctx):\n    exec({GROW_MEMORY!r})\n    return {{}}\n",
        limits={"memory_mb": 64},
    )
    result = wait_for(live_client, live_org, run(live_client, live_org, "hog"))
    assert result["status"] == "failed"
    assert result["error"]["type"] == "memory_limit", result["error"]
    assert "memory_mb" in result["error"]["hint"]


def test_memory_limit_stops_a_command(live_client, live_org):
    command_agent(
        live_client, live_org, "hog-cmd", py_command(GROW_MEMORY), limits={"memory_mb": 64}
    )
    result = wait_for(live_client, live_org, run(live_client, live_org, "hog-cmd"))
    assert result["error"]["type"] == "memory_limit", result["error"]
    assert "limits.memory_mb=64" in result["error"]["message"]


def test_cpu_limit_stops_a_busy_command(live_client, live_org):
    command_agent(
        live_client,
        live_org,
        "spin",
        py_command("while True: pass"),
        limits={"cpu_seconds": 1},
        timeout_seconds=30,
    )
    result = wait_for(live_client, live_org, run(live_client, live_org, "spin"))
    assert result["status"] == "failed"
    assert result["error"]["type"] == "cpu_limit", result["error"]
    assert result["resource_usage"]["cpu_seconds"] >= 1


def test_file_size_limit_stops_a_command(live_client, live_org):
    # The suite's workers allow 8 MB files (RUNYARD_CHILD_MAX_FILE_MB); head is killed by SIGXFSZ.
    command_agent(live_client, live_org, "writer", ["sh", "-c", "head -c 20000000 /dev/zero > f"])
    result = wait_for(live_client, live_org, run(live_client, live_org, "writer"))
    assert result["status"] == "failed"
    assert result["error"]["type"] == "file_size_limit", result["error"]


def test_process_limit_stops_a_fork_storm(live_client, live_org):
    marker = f"storm-{uuid.uuid4().hex}"
    source = (
        "import subprocess, sys, time\n"
        "def main(input, ctx):\n"
        "    code = 'import time; time.sleep(30)'\n"
        f"    procs = [subprocess.Popen([sys.executable, '-c', code, '{marker}'])"
        " for _ in range(40)]\n"
        "    time.sleep(30)\n"
        "    return {}\n"
    )
    script_agent(live_client, live_org, "storm", source)
    result = wait_for(live_client, live_org, run(live_client, live_org, "storm"))
    assert result["status"] == "failed"
    assert result["error"]["type"] == "process_limit", result["error"]
    assert "RUNYARD_CHILD_MAX_PROCESSES=16" in result["error"]["message"]
    assert processes_with(marker) == []


@pytest.mark.parametrize("runtime", ["python", "script", "command"])
def test_output_over_max_output_bytes_is_output_too_large(live_client, live_org, runtime):
    name = f"big-{runtime}"
    limits = {"max_output_bytes": 1000}
    if runtime == "python":
        python_agent(live_client, live_org, name, "big_output", limits=limits)
    elif runtime == "script":
        source = "def main(input, ctx):\n    return {'blob': 'x' * input['size']}\n"
        script_agent(live_client, live_org, name, source, limits=limits)
    else:
        code = (
            "import json, os, sys\nsize = json.load(sys.stdin)['size']\n"
            "json.dump({'blob': 'x' * size}, open(os.environ['RUNYARD_OUTPUT_PATH'], 'w'))"
        )
        command_agent(live_client, live_org, name, py_command(code), limits=limits)
    small = wait_for(live_client, live_org, run(live_client, live_org, name, {"size": 10}))
    assert small["status"] == "succeeded", small
    result = wait_for(live_client, live_org, run(live_client, live_org, name, {"size": 5000}))
    assert result["status"] == "failed"
    assert result["error"]["type"] == "output_too_large", result["error"]


@pytest.mark.parametrize("runtime", ["python", "command"])
def test_a_log_flood_is_cut_with_a_closing_count(live_client, live_org, runtime):
    name = f"flood-{runtime}"
    if runtime == "python":
        python_agent(live_client, live_org, name, "flood", limits={"max_log_lines": 50})
    else:
        code = (
            "import json, os, sys\n"
            "for n in range(json.load(sys.stdin)['lines']): print(f'line {n}')\n"
            "json.dump({}, open(os.environ['RUNYARD_OUTPUT_PATH'], 'w'))"
        )
        command_agent(live_client, live_org, name, py_command(code), limits={"max_log_lines": 50})
    execution_id = run(live_client, live_org, name, {"lines": 3000})
    assert wait_for(live_client, live_org, execution_id)["status"] == "succeeded"
    lines = logs(live_client, live_org, execution_id)
    assert len(lines) == 51
    assert lines[49]["message"] == "line 49"
    assert lines[50]["message"] == "dropped 2950 log lines beyond max_log_lines=50"
    assert lines[50]["level"] == "warning"


# ---------------------------------------------------------------------------------------------
# timeouts and cancellation


def test_command_timeout_terms_then_kills_the_whole_group(live_client, live_org):
    # A duration no other process uses marks this test's sleeps.
    marker = f"300.{uuid.uuid4().int % 10**9:09d}"
    # The shell ignores SIGTERM and leaves children behind: only SIGKILL of the group ends it.
    script = f"trap '' TERM; sleep {marker} & sleep {marker}; sleep {marker}"
    command_agent(live_client, live_org, "hang", ["sh", "-c", script], timeout_seconds=1)
    started = time.monotonic()
    result = wait_for(live_client, live_org, run(live_client, live_org, "hang"))
    assert result["status"] == "timed_out"
    assert result["error"]["type"] == "timeout"
    assert "SIGTERM, then SIGKILL" in result["error"]["message"]
    assert time.monotonic() - started < 10
    assert processes_with(marker) == []


@pytest.mark.parametrize("runtime", ["script", "command"])
def test_cancel_stops_a_running_child_within_two_seconds(live_client, live_org, runtime):
    name = f"cancel-{runtime}"
    if runtime == "script":
        source = "import time\ndef main(input, ctx):\n    time.sleep(60)\n    return {}\n"
        script_agent(live_client, live_org, name, source)
    else:
        command_agent(live_client, live_org, name, ["sh", "-c", "trap '' TERM; sleep 60"])
    execution_id = run(live_client, live_org, name)
    wait_until(
        lambda: (
            live_client.get(
                f"/api/v1/executions/{execution_id}", headers=live_org.headers
            ).get_json()["status"]
            == "running"
        )
    )
    response = live_client.post(
        f"/api/v1/executions/{execution_id}/cancel", headers=live_org.headers
    )
    assert response.status_code == 202
    result = wait_for(live_client, live_org, execution_id)
    assert result["status"] == "cancelled"
    assert seconds_from_cancel_to_finish(execution_id) < 2.0


def test_python_agent_that_ignores_cancel_is_interrupted_after_the_grace(live_client, live_org):
    python_agent(live_client, live_org, "deaf", "ignores_cancel")
    execution_id = run(live_client, live_org, "deaf", {"seconds": 30})
    wait_until(
        lambda: (
            live_client.get(
                f"/api/v1/executions/{execution_id}", headers=live_org.headers
            ).get_json()["status"]
            == "running"
        )
    )
    live_client.post(f"/api/v1/executions/{execution_id}/cancel", headers=live_org.headers)
    result = wait_for(live_client, live_org, execution_id)
    # Seen within about a second, interrupted after the suite's 1 s grace.
    assert result["status"] == "cancelled"
    assert seconds_from_cancel_to_finish(execution_id) < 4


def test_python_agent_that_swallows_the_interruption_is_killed(live_client, live_org):
    python_agent(live_client, live_org, "stubborn", "stubborn")
    execution_id = run(live_client, live_org, "stubborn", {"seconds": 60})
    wait_until(
        lambda: (
            live_client.get(
                f"/api/v1/executions/{execution_id}", headers=live_org.headers
            ).get_json()["status"]
            == "running"
        )
    )
    live_client.post(f"/api/v1/executions/{execution_id}/cancel", headers=live_org.headers)
    result = wait_for(live_client, live_org, execution_id, timeout=15)
    assert result["status"] == "cancelled"
    assert "killed" in result["error"]["message"]
    # The pool process it ran in was replaced: the worker goes on serving.
    python_agent(live_client, live_org, "after", "echo")
    assert wait_for(live_client, live_org, run(live_client, live_org, "after"))["status"] == (
        "succeeded"
    )


def test_python_agent_that_swallows_the_soft_timeout_is_timed_out(live_client, live_org):
    python_agent(live_client, live_org, "overrun", "stubborn", timeout_seconds=1)
    result = wait_for(
        live_client, live_org, run(live_client, live_org, "overrun", {"seconds": 60}), timeout=20
    )
    assert result["status"] == "timed_out"
    assert result["error"]["type"] == "timeout"


# ---------------------------------------------------------------------------------------------
# retries and attempts


def test_each_attempt_keeps_its_own_error_and_worker(live_client, live_org):
    python_agent(
        live_client,
        live_org,
        "flaky",
        "flaky",
        retry={"max_retries": 3, "backoff_seconds": 0.1, "jitter": False},
    )
    execution_id = run(live_client, live_org, "flaky", {"succeed_on": 3})
    result = wait_for(live_client, live_org, execution_id)
    assert result["status"] == "succeeded" and result["attempts"] == 3
    response = live_client.get(
        f"/api/v1/executions/{execution_id}/attempts", headers=live_org.headers
    )
    assert response.status_code == 200
    attempts = response.get_json()
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["status"] for a in attempts] == ["failed", "failed", "succeeded"]
    assert "attempt 1" in attempts[0]["error"]["message"]
    assert "attempt 2" in attempts[1]["error"]["message"]
    assert attempts[2]["error"] is None
    assert all(a["worker"] and a["worker"].startswith("test-") for a in attempts)
    assert all(a["started_at"] <= a["finished_at"] for a in attempts)
    # Backoff: the second attempt started after the first one finished.
    assert attempts[1]["started_at"] >= attempts[0]["finished_at"]


def test_output_invalid_and_final_errors_are_never_retried(live_client, live_org):
    retry = {"max_retries": 3, "backoff_seconds": 0.1, "retry_on": ["runtime_error"]}
    python_agent(
        live_client,
        live_org,
        "wrong",
        "wrong_output",
        output_schema={"type": "object", "properties": {"count": {"type": "integer"}}},
        retry=retry,
    )
    result = wait_for(live_client, live_org, run(live_client, live_org, "wrong"))
    assert result["error"]["type"] == "output_invalid" and result["attempts"] == 1
    command_agent(live_client, live_org, "gone", ["sh", "-c", "exit 1"], retry=retry)
    result = wait_for(live_client, live_org, run(live_client, live_org, "gone"))
    assert result["status"] == "failed" and result["attempts"] == 4


def test_attempts_of_another_org_are_404(live_client, live_org, other_live_org):
    python_agent(live_client, live_org, "echo", "echo")
    execution_id = run(live_client, live_org, "echo")
    wait_for(live_client, live_org, execution_id)
    response = live_client.get(
        f"/api/v1/executions/{execution_id}/attempts", headers=other_live_org.headers
    )
    assert response.status_code == 404


# ---------------------------------------------------------------------------------------------
# queues, priority and cancel before start


def test_priority_nine_behind_a_backlog_starts_first(live_client, live_org, tmp_path):
    queue = f"prio-{uuid.uuid4().hex[:8]}"
    python_agent(live_client, live_org, "nap", "sleepy", queue=queue)
    # On RabbitMQ too: its queues carry x-max-priority and the API's 9 goes out as 9.
    backlog = [run(live_client, live_org, "nap", {"seconds": 0.05}, priority=0) for _ in range(8)]
    urgent = run(live_client, live_org, "nap", {"seconds": 0.05}, priority=9)
    wait_until(lambda: queue_depth(queue) == 9)
    with celery_worker(tmp_path / "prio.log", queues=queue, concurrency=1, name="prio"):
        results = [wait_for(live_client, live_org, e) for e in [*backlog, urgent]]
    order = sorted(results, key=lambda r: r["started_at"])
    assert order[0]["id"] == urgent, [r["priority"] for r in order]


def test_a_cancelled_queued_execution_never_starts_even_with_its_message_queued(
    live_client, live_org, tmp_path
):
    queue = f"held-{uuid.uuid4().hex[:8]}"
    python_agent(live_client, live_org, "held", "echo", queue=queue)
    execution_id = run(live_client, live_org, "held")
    wait_until(lambda: queue_depth(queue) == 1)
    response = live_client.post(
        f"/api/v1/executions/{execution_id}/cancel", headers=live_org.headers
    )
    assert response.status_code == 202 and response.get_json()["status"] == "cancelled"
    # A worker started afterwards (as after a restart) takes the message and drops it.
    with celery_worker(tmp_path / "held.log", queues=queue, concurrency=1, name="held"):
        wait_until(lambda: queue_depth(queue) == 0)
        time.sleep(0.5)
    result = live_client.get(f"/api/v1/executions/{execution_id}", headers=live_org.headers)
    body = result.get_json()
    assert body["status"] == "cancelled" and body["started_at"] is None and body["attempts"] == 0
    assert (
        live_client.post(
            f"/api/v1/executions/{execution_id}/cancel", headers=live_org.headers
        ).status_code
        == 409
    )
