"""`$secret` references resolved by a real worker: the runtime gets the value; the logs (message
and fields), progress, output, error, events and every API answer show `[secret:<name>]`;
nothing in a `pg_dump` of the database holds it; a deleted secret fails the execution clearly."""

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import wait_for
from tests.local_http import Reply, local_server
from tests.workers.test_runs import define, logs, run, script_agent

pytestmark = pytest.mark.worker

SCRIPT = """
def main(input, ctx):
    key = ctx.config["creds"]["key"]
    ctx.log.info(f"using {key}", token=key, nested={"list": [key]}, **{key: "as a field name"})
    print("printed " + key)
    ctx.progress(0.5, f"half way with {key}")
    if input.get("fail"):
        raise RuntimeError(f"failed holding {key}")
    return {"echo": key, "length": len(key), "plain": ctx.config["plain"]}
"""
COMMAND = (
    "import json, os, sys\n"
    "token = os.environ['TOKEN']\n"
    "print('token is ' + token, file=sys.stderr, flush=True)\n"
    "json.dump({'length': len(token)}, open(os.environ['RUNYARD_OUTPUT_PATH'], 'w'))\n"
)


def secret_value() -> str:
    return f"sk-live-{uuid.uuid4().hex}"


def put(client, org, name, value):
    response = client.put(f"/api/v1/secrets/{name}", json={"value": value}, headers=org.headers)
    assert response.status_code == 200, response.get_json()


def everything_shown(client, org, execution_id: str, agent: str) -> str:
    """Every answer about the execution and its agent, as text."""
    paths = [
        f"/api/v1/executions/{execution_id}",
        f"/api/v1/executions/{execution_id}/logs",
        f"/api/v1/executions/{execution_id}/logs?format=ndjson",
        f"/api/v1/executions/{execution_id}/attempts",
        f"/api/v1/executions/{execution_id}/events",
        f"/api/v1/logs?execution_id={execution_id}",
        "/api/v1/executions",
        f"/api/v1/agents/{agent}",
        f"/api/v1/agents/{agent}/versions",
        "/api/v1/agents",
        "/api/v1/secrets",
    ]
    shown = []
    for path in paths:
        response = client.get(path, headers=org.headers)
        assert response.status_code == 200, (path, response.get_data(as_text=True)[:300])
        shown.append(response.get_data(as_text=True))
    return "\n".join(shown)


def test_a_script_gets_the_value_and_nothing_shows_it(live_client, live_org):
    value = secret_value()
    put(live_client, live_org, "api-key", value)
    config = {"creds": {"key": {"$secret": "api-key"}}, "plain": "visible"}
    script_agent(live_client, live_org, "uses-key", SCRIPT, config=config)
    execution_id = run(live_client, live_org, "uses-key")
    result = wait_for(live_client, live_org, execution_id)
    assert result["status"] == "succeeded", result
    assert result["output"] == {
        "echo": "[secret:api-key]",
        "length": len(value),
        "plain": "visible",
    }
    assert result["progress"]["message"] == "half way with [secret:api-key]"
    lines = logs(live_client, live_org, execution_id)
    using = next(line for line in lines if line["message"].startswith("using"))
    assert using["message"] == "using [secret:api-key]"
    assert using["fields"]["token"] == "[secret:api-key]"
    assert using["fields"]["nested"] == {"list": ["[secret:api-key]"]}
    assert using["fields"]["[secret:api-key]"] == "as a field name"
    assert any(line["message"] == "printed [secret:api-key]" for line in lines)
    agent = live_client.get("/api/v1/agents/uses-key", headers=live_org.headers).get_json()
    assert agent["config"] == config
    assert value not in everything_shown(live_client, live_org, execution_id, "uses-key")


def test_an_error_holding_the_value_shows_the_name(live_client, live_org):
    value = secret_value()
    put(live_client, live_org, "api-key", value)
    config = {"creds": {"key": {"$secret": "api-key"}}, "plain": "x"}
    script_agent(live_client, live_org, "fails-with-key", SCRIPT, config=config)
    execution_id = run(live_client, live_org, "fails-with-key", {"fail": True})
    result = wait_for(live_client, live_org, execution_id)
    assert result["status"] == "failed", result
    assert result["error"]["message"] == "RuntimeError: failed holding [secret:api-key]"
    assert value not in everything_shown(live_client, live_org, execution_id, "fails-with-key")


def test_a_command_gets_it_in_its_environment(live_client, live_org):
    value = secret_value()
    put(live_client, live_org, "token", value)
    runtime = {
        "type": "command",
        "argv": ["python3", "-c", COMMAND],
        "env": {"TOKEN": {"$secret": "token"}, "PLAIN": "p"},
    }
    define(live_client, live_org, "env-user", runtime)
    execution_id = run(live_client, live_org, "env-user")
    result = wait_for(live_client, live_org, execution_id)
    assert result["status"] == "succeeded", result
    assert result["output"] == {"length": len(value)}
    messages = [line["message"] for line in logs(live_client, live_org, execution_id)]
    assert "token is [secret:token]" in messages
    assert value not in everything_shown(live_client, live_org, execution_id, "env-user")


def test_an_http_agent_sends_it_as_a_header(live_client, live_org):
    value = secret_value()
    put(live_client, live_org, "bearer", value)
    with local_server() as server:
        server.route("/call", Reply(200, {"ok": True}))
        runtime = {
            "type": "http",
            "url": server.url("/call"),
            "headers": {"Authorization": {"$secret": "bearer"}, "X-Plain": "p"},
        }
        define(live_client, live_org, "caller", runtime)
        execution_id = run(live_client, live_org, "caller")
        result = wait_for(live_client, live_org, execution_id)
        assert result["status"] == "succeeded", result
        (request,) = server.seen("/call")
    assert request.headers["Authorization"] == value and request.headers["X-Plain"] == "p"
    assert value not in everything_shown(live_client, live_org, execution_id, "caller")


def test_a_deleted_secret_fails_the_execution_with_secret_missing(live_client, live_org):
    put(live_client, live_org, "gone", secret_value())
    config = {"creds": {"key": {"$secret": "gone"}}, "plain": "x"}
    retry = {"max_retries": 2, "backoff_seconds": 0, "jitter": False}
    script_agent(live_client, live_org, "lost-key", SCRIPT, config=config, retry=retry)
    deleted = live_client.delete("/api/v1/secrets/gone", headers=live_org.headers)
    assert deleted.status_code == 204
    result = wait_for(live_client, live_org, run(live_client, live_org, "lost-key"))
    assert result["status"] == "failed" and result["attempts"] == 1, result
    error = result["error"]
    assert error["type"] == "secret_missing" and "gone" in error["message"]
    assert "PUT /api/v1/secrets" in error["hint"]


def test_a_header_secret_with_a_line_break_fails_without_calling(live_client, live_org):
    put(live_client, live_org, "two-lines", "first\r\nX-Injected: yes")
    with local_server() as server:
        server.route("/call", Reply(200, {"ok": True}))
        runtime = {
            "type": "http",
            "url": server.url("/call"),
            "headers": {"Authorization": {"$secret": "two-lines"}},
        }
        define(live_client, live_org, "injector", runtime)
        result = wait_for(live_client, live_org, run(live_client, live_org, "injector"))
        assert server.seen("/call") == []
    assert result["status"] == "failed" and result["error"]["type"] == "secret_missing"
    assert "line break" in result["error"]["message"] and "first" not in json.dumps(result)


# ---------------------------------------------------------------------------------------------
# At rest


def pg_dump_binary() -> str:
    """The embedded PostgreSQL's pg_dump (the newest at hand), else the one on PATH."""
    import pgserver

    bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"
    found = str(bundled) if bundled.exists() else shutil.which("pg_dump")
    assert found, "no pg_dump: install the embedded extra (pgserver) or PostgreSQL's client"
    return found


def test_no_secret_is_in_a_pg_dump_of_the_database(live_client, live_org, database_url):
    value = secret_value()
    put(live_client, live_org, "api-key", value)
    config = {"creds": {"key": {"$secret": "api-key"}}, "plain": "x"}
    script_agent(live_client, live_org, "dumped", SCRIPT, config=config)
    trigger = live_client.post(
        "/api/v1/triggers",
        json={"name": "hook", "target": {"agent": "dumped"}, "input": {}},
        headers=live_org.headers,
    ).get_json()
    notification = live_client.post(
        "/api/v1/notifications",
        json={"name": "ops", "url": "http://127.0.0.2:9/", "events": ["execution.failed"]},
        headers=live_org.headers,
    ).get_json()
    for execution_input in ({}, {"fail": True}):
        wait_for(live_client, live_org, run(live_client, live_org, "dumped", execution_input))
    url = make_url(database_url).set(drivername="postgresql")
    dump = subprocess.run(
        [pg_dump_binary(), "--data-only", url.render_as_string(hide_password=False)],
        capture_output=True,
        timeout=120,
        env={**os.environ, "LC_ALL": "C"},
    )
    assert dump.returncode == 0, dump.stderr.decode()[-2000:]
    text = dump.stdout.decode("utf-8", "replace")
    assert "[secret:api-key]" in text  # the dump holds the executions, redacted
    for clear in (value, trigger["secret"], notification["secret"]):
        assert clear not in text
    assert json.dumps(value) not in text
