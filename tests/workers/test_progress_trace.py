"""ctx.progress and the W3C trace context, in every runtime, through the public API with real
workers (an http agent calls a local server)."""

import pytest

from tests.conftest import wait_for
from tests.local_http import Reply, local_server
from tests.workers.test_chains_runs import wait_chain
from tests.workers.test_runs import define, logs, python_agent, script_agent
from workers.context import checked_progress

pytestmark = pytest.mark.worker

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def submit(client, org, agent, payload=None, traceparent=TRACEPARENT):
    headers = {**org.headers, **({"traceparent": traceparent} if traceparent else {})}
    response = client.post(
        f"/api/v1/agents/{agent}/executions", json={"input": payload or {}}, headers=headers
    )
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def test_python_progress_and_traceparent(live_client, live_org):
    python_agent(live_client, live_org, "reporter", "reporter")
    queued = submit(live_client, live_org, "reporter", {"lines": 3, "pause": 0.01})
    assert queued["traceparent"] == TRACEPARENT and queued["progress"] is None
    result = wait_for(live_client, live_org, queued["id"])
    assert result["status"] == "succeeded", result
    assert result["output"]["traceparent"] == TRACEPARENT
    assert "from 0 to 1, got 1.5" in result["output"]["refused"]
    # Throttled writes, but the last value always lands before the outcome.
    progress = result["progress"]
    assert progress["fraction"] == 1.0 and progress["message"] == "line 2 of 3"
    assert progress["at"].endswith("Z")


def test_script_progress_and_traceparent(live_client, live_org):
    source = (
        "import os\n"
        "def main(input, ctx):\n"
        "    ctx.progress(0.25)\n"
        "    ctx.progress(0.5, 'half way')\n"
        "    try:\n"
        "        ctx.progress(-1)\n"
        "    except ValueError as exc:\n"
        "        refused = str(exc)\n"
        "    return {'ctx': ctx.traceparent, 'env': os.environ.get('TRACEPARENT'),\n"
        "            'refused': refused}\n"
    )
    script_agent(live_client, live_org, "script-progress", source)
    result = wait_for(live_client, live_org, submit(live_client, live_org, "script-progress")["id"])
    assert result["status"] == "succeeded", result
    assert result["output"]["ctx"] == TRACEPARENT and result["output"]["env"] == TRACEPARENT
    assert "got -1" in result["output"]["refused"]
    assert result["progress"]["fraction"] == 0.5
    assert result["progress"]["message"] == "half way"


def test_command_progress_lines_and_traceparent(live_client, live_org):
    script = (
        'echo "runyard:progress 0.4 reading"; '
        'echo "runyard:progress 7"; '
        'echo "runyard:progress 0.8 writing" >&2; '
        "echo plain line; "
        'printf \'{"env": "%s"}\' "$TRACEPARENT" > "$RUNYARD_OUTPUT_PATH"'
    )
    define(live_client, live_org, "cmd-progress", {"type": "command", "argv": ["sh", "-c", script]})
    result = wait_for(live_client, live_org, submit(live_client, live_org, "cmd-progress")["id"])
    assert result["status"] == "succeeded", result
    assert result["output"] == {"env": TRACEPARENT}
    assert result["progress"]["fraction"] == 0.8
    assert result["progress"]["message"] == "writing"
    messages = [line["message"] for line in logs(live_client, live_org, result["id"])]
    # Progress lines are not log lines; a malformed one says why it was refused.
    assert "plain line" in messages
    assert not any(m.startswith("runyard:progress") for m in messages)
    (refused,) = [m for m in messages if m.startswith("progress line refused")]
    assert "from 0 to 1, got 7.0" in refused


def test_http_progress_header_and_traceparent(live_client, live_org):
    with local_server() as server:
        server.route(
            "/work",
            Reply(
                200,
                {"done": True},
                headers={"Runyard-Progress": "0.9", "Runyard-Progress-Message": "nearly"},
            ),
        )
        define(
            live_client,
            live_org,
            "http-progress",
            {"type": "http", "url": server.url("/work"), "headers": {"TraceParent": "spoofed"}},
        )
        result = wait_for(
            live_client, live_org, submit(live_client, live_org, "http-progress")["id"]
        )
        (request,) = server.seen("/work")
    assert result["status"] == "succeeded", result
    assert result["progress"]["fraction"] == 0.9 and result["progress"]["message"] == "nearly"
    sent = {name.lower(): value for name, value in request.headers.items()}
    assert sent["traceparent"] == TRACEPARENT


def test_http_progress_header_out_of_range_is_logged(live_client, live_org):
    with local_server() as server:
        server.route("/work", Reply(200, {"done": True}, headers={"Runyard-Progress": "1.5"}))
        define(
            live_client, live_org, "http-bad-progress", {"type": "http", "url": server.url("/work")}
        )
        result = wait_for(
            live_client,
            live_org,
            submit(live_client, live_org, "http-bad-progress", traceparent=None)["id"],
        )
        (request,) = server.seen("/work")
    assert result["status"] == "succeeded" and result["progress"] is None
    assert "traceparent" not in {name.lower() for name in request.headers}
    messages = [line["message"] for line in logs(live_client, live_org, result["id"])]
    assert any("Runyard-Progress header refused" in m and "got 1.5" in m for m in messages)


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # uppercase
    ],
)
def test_a_malformed_traceparent_is_ignored(live_client, live_org, value):
    python_agent(live_client, live_org, "echo", "echo")
    queued = submit(live_client, live_org, "echo", traceparent=value)
    assert queued["traceparent"] is None


def test_a_batch_keeps_the_traceparent_for_every_item(live_client, live_org):
    python_agent(live_client, live_org, "reporter", "reporter")
    response = live_client.post(
        "/api/v1/agents/reporter/executions/batch",
        json={"items": [{"input": {"lines": 1, "pause": 0}}] * 2},
        headers={**live_org.headers, "traceparent": TRACEPARENT},
    )
    assert response.status_code == 202, response.get_json()
    for execution_id in response.get_json()["ids"]:
        result = wait_for(live_client, live_org, execution_id)
        assert result["traceparent"] == TRACEPARENT
        assert result["output"]["traceparent"] == TRACEPARENT


def test_a_chain_submit_hands_its_traceparent_to_every_step(live_client, live_org):
    python_agent(live_client, live_org, "reporter", "reporter")
    chain = {
        "name": "traced",
        "input_schema": {"type": "object"},
        "steps": [
            {"name": "first", "agent": "reporter", "input": {"lines": 1, "pause": 0}},
            {"name": "second", "agent": "reporter", "input": {"lines": 1, "pause": 0}},
        ],
    }
    created = live_client.post("/api/v1/chains", json=chain, headers=live_org.headers)
    assert created.status_code == 201, created.get_json()
    response = live_client.post(
        "/api/v1/chains/traced/executions",
        json={"input": {}},
        headers={**live_org.headers, "traceparent": TRACEPARENT},
    )
    assert response.status_code == 202, response.get_json()
    body = wait_chain(live_client, live_org, response.get_json()["id"])
    assert body["status"] == "succeeded", body
    assert len(body["steps"]) == 2
    for step in body["steps"]:
        execution = live_client.get(
            f"/api/v1/executions/{step['execution_id']}", headers=live_org.headers
        ).get_json()
        assert execution["traceparent"] == TRACEPARENT, execution
        assert execution["output"]["traceparent"] == TRACEPARENT, execution


def test_a_progress_message_postgresql_cannot_store_is_written_out():
    # jsonb refuses U+0000 and unpaired surrogates: written out, as in log lines.
    assert checked_progress(0.5, "a\x00b\ud800") == (0.5, "a\\x00b\\ud800")
    assert checked_progress(1, "x" * 5000)[1] == "x" * 1000
