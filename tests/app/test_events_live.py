"""Live event streams (Server-Sent Events) from a real `runyard api` (gunicorn, one process, a
small stream cap and a 1 s keepalive) with a real worker, read by a plain HTTP client that
drops its connection and resumes."""

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from app.embedded import free_port
from tests.conftest import wait_for, wait_until
from tests.workers.test_runs import logs, python_agent

pytestmark = pytest.mark.worker

MAX_STREAMS = 4
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def api(worker, tmp_path_factory) -> Iterator[tuple[str, int]]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("api") / "api.log"
    env = {
        **os.environ,
        "RUNYARD_API_WORKERS": "1",
        "RUNYARD_MAX_STREAMS_PER_PROCESS": str(MAX_STREAMS),
        "RUNYARD_STREAM_KEEPALIVE_SECONDS": "1",
    }
    runyard = Path(sys.executable).parent / "runyard"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(runyard), "api", "--port", str(port)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def answers() -> bool:
            healthz = f"http://127.0.0.1:{port}/healthz"
            with contextlib.suppress(OSError), urllib.request.urlopen(healthz, timeout=2):
                return True
            assert process.poll() is None, log_path.read_text()[-3000:]
            return False

        wait_until(answers, timeout=30)
        yield "127.0.0.1", port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Events:
    """An SSE client on http.client: each event as a dict (`event`, `data` parsed, `id`), and
    comment lines as {"comment": text}."""

    def __init__(self, api, path: str, headers: dict[str, str]) -> None:
        self.connection = http.client.HTTPConnection(*api, timeout=20)
        self.connection.request("GET", path, headers=headers)
        self.response = self.connection.getresponse()

    def __iter__(self) -> Iterator[dict]:
        fields: dict = {}
        while True:
            raw = self.response.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                yield {"comment": line[1:].strip(), "at": time.time()}
            elif line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif fields:
                event = {"event": fields.get("event"), "data": json.loads(fields["data"])}
                event["id"] = int(fields["id"]) if "id" in fields else None
                event["at"] = time.time()
                yield event
                fields = {}

    def close(self) -> None:
        self.connection.close()


def stream(api, org, path, **headers) -> Events:
    events = Events(api, path, {**org.headers, **headers})
    assert events.response.status == 200, events.response.read()
    assert events.response.getheader("Content-Type").startswith("text/event-stream")
    return events


def submit(client, org, agent, payload, **headers):
    response = client.post(
        f"/api/v1/agents/{agent}/executions",
        json={"input": payload},
        headers={**org.headers, **headers},
    )
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def test_a_stream_shows_lines_and_status_live_and_resumes_where_it_broke(
    api, live_client, live_org
):
    python_agent(live_client, live_org, "reporter", "reporter")
    execution_id = submit(
        live_client, live_org, "reporter", {"lines": 8, "pause": 0.3}, traceparent=TRACEPARENT
    )
    path = f"/api/v1/executions/{execution_id}/events"
    first = stream(api, live_org, path)
    before_drop = []
    for event in first:
        before_drop.append(event)
        if sum(e.get("event") == "log" for e in before_drop) == 3:
            break
    first.close()  # dropped mid-way
    last_id = [e["id"] for e in before_drop if e.get("event") == "log"][-1]
    after = list(stream(api, live_org, path, **{"Last-Event-ID": str(last_id)}))
    received = before_drop + after

    lines = [e for e in received if e.get("event") == "log"]
    # Every line exactly once, in order, as /logs shows it.
    assert [e["id"] for e in lines] == list(range(1, 9))
    assert [e["data"] for e in lines] == logs(live_client, live_org, execution_id)
    assert [e["data"]["message"] for e in lines] == [f"line {n}" for n in range(8)]
    # Lines logged while streaming arrive within a second of being logged.
    live_lags = [
        e["at"] - datetime.fromisoformat(e["data"]["ts"]).timestamp()
        for e in after
        if e.get("event") == "log"
    ]
    assert len(live_lags) == 5 and max(live_lags) < 1.0, live_lags

    statuses = [e["data"] for e in received if e.get("event") == "status"]
    assert set(statuses[0]) == {"status", "attempt", "progress", "waiting_for"}
    assert {s["status"] for s in statuses} >= {"running", "succeeded"}
    fractions = [s["progress"]["fraction"] for s in statuses if s["progress"]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert after[-1]["event"] == "end" and sum(e.get("event") == "end" for e in received) == 1
    end = after[-1]["data"]
    got = live_client.get(f"/api/v1/executions/{execution_id}", headers=live_org.headers)
    assert end == got.get_json()
    assert end["status"] == "succeeded" and end["traceparent"] == TRACEPARENT
    assert end["output"]["traceparent"] == TRACEPARENT


def test_a_finished_execution_streams_its_history_then_end(api, live_client, live_org):
    python_agent(live_client, live_org, "chatty", "chatty")
    execution_id = submit(live_client, live_org, "chatty", {})
    wait_for(live_client, live_org, execution_id)
    path = f"/api/v1/executions/{execution_id}/events"
    events = list(stream(api, live_org, path))
    kinds = [e["event"] for e in events]
    assert kinds == ["log"] * 5 + ["status", "end"]
    assert events[-2]["data"]["status"] == "succeeded"
    resumed = list(stream(api, live_org, path, **{"Last-Event-ID": "4"}))
    assert [e["event"] for e in resumed] == ["log", "status", "end"] and resumed[0]["id"] == 5


def test_a_queued_execution_keeps_the_stream_alive_and_ends_on_cancel(api, live_client, live_org):
    # A queue no worker serves: it stays queued until cancelled.
    python_agent(live_client, live_org, "parked", "echo", queue="nobody-serves-this")
    execution_id = submit(live_client, live_org, "parked", {})
    events = iter(stream(api, live_org, f"/api/v1/executions/{execution_id}/events"))
    first = next(events)
    assert first["event"] == "status" and first["data"]["status"] == "queued"
    assert next(events) == {"comment": "keepalive", "at": pytest.approx(time.time(), abs=3)}
    cancelled = live_client.post(
        f"/api/v1/executions/{execution_id}/cancel", headers=live_org.headers
    )
    assert cancelled.status_code == 202
    rest = [e for e in events if "comment" not in e]
    assert [e["event"] for e in rest] == ["status", "end"]
    assert rest[0]["data"]["status"] == "cancelled" and rest[1]["data"]["status"] == "cancelled"


def test_streams_past_the_cap_answer_503_and_ordinary_requests_go_on(api, live_client, live_org):
    python_agent(live_client, live_org, "parked", "echo", queue="nobody-serves-this")
    ids = [submit(live_client, live_org, "parked", {}) for _ in range(MAX_STREAMS + 1)]
    open_streams = [
        stream(api, live_org, f"/api/v1/executions/{execution_id}/events")
        for execution_id in ids[:MAX_STREAMS]
    ]
    try:
        connection = http.client.HTTPConnection(*api, timeout=10)
        connection.request("GET", f"/api/v1/executions/{ids[-1]}/events", headers=live_org.headers)
        refused = connection.getresponse()
        body = json.loads(refused.read())
        assert refused.status == 503 and refused.getheader("Retry-After") == "5"
        assert body["code"] == 503 and "RUNYARD_MAX_STREAMS_PER_PROCESS" in body["message"]
        assert body["hint"]
        # The API's own threads are untouched by the streams.
        connection.request("GET", f"/api/v1/executions/{ids[-1]}", headers=live_org.headers)
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        for events in open_streams:
            events.close()

    # A dropped stream gives its slot back (noticed at its next keepalive, within a second).
    def opens() -> bool:
        events = Events(api, f"/api/v1/executions/{ids[-1]}/events", live_org.headers)
        events.close()
        return events.response.status == 200

    wait_until(opens, timeout=10, interval=0.5)
    for execution_id in ids:
        live_client.post(f"/api/v1/executions/{execution_id}/cancel", headers=live_org.headers)


def test_another_organizations_streams_answer_404(api, live_client, live_org, other_live_org):
    python_agent(live_client, live_org, "echo", "echo")
    execution_id = submit(live_client, live_org, "echo", {})
    for path in (
        f"/api/v1/executions/{execution_id}/events",
        "/api/v1/executions/not-a-uuid/events",
        f"/api/v1/chain-executions/{execution_id}/events",
    ):
        events = Events(api, path, other_live_org.headers)
        body = json.loads(events.response.read())
        assert events.response.status == 404 and body["code"] == 404, path
        assert events.response.getheader("Content-Type") == "application/json"


def test_a_bad_last_event_id_is_422(api, live_client, live_org):
    python_agent(live_client, live_org, "echo", "echo")
    execution_id = submit(live_client, live_org, "echo", {})
    events = Events(
        api,
        f"/api/v1/executions/{execution_id}/events",
        {**live_org.headers, "Last-Event-ID": "yesterday"},
    )
    assert events.response.status == 422
    assert json.loads(events.response.read())["code"] == 422


def test_a_chain_stream_shows_each_step_then_end(api, live_client, live_org):
    python_agent(live_client, live_org, "slow", "sleepy")
    define_chain = live_client.post(
        "/api/v1/chains",
        json={
            "name": "two-naps",
            "steps": [
                {"name": "first", "agent": "slow", "input": {"seconds": 0.5}},
                {"name": "second", "agent": "slow", "input": {"seconds": 0.5}},
            ],
        },
        headers=live_org.headers,
    )
    assert define_chain.status_code == 201, define_chain.get_json()
    started = live_client.post(
        "/api/v1/chains/two-naps/executions", json={"input": {}}, headers=live_org.headers
    )
    assert started.status_code == 202, started.get_json()
    chain_id = started.get_json()["id"]
    events = [
        e
        for e in stream(api, live_org, f"/api/v1/chain-executions/{chain_id}/events")
        if "comment" not in e
    ]
    assert events[-1]["event"] == "end"
    end = events[-1]["data"]
    got = live_client.get(f"/api/v1/chain-executions/{chain_id}", headers=live_org.headers)
    assert end == got.get_json() and end["status"] == "succeeded"
    steps = [e["data"] for e in events if e["event"] == "step"]
    for name in ("first", "second"):
        seen = [s["status"] for s in steps if s["name"] == name]
        assert seen[-1] == "succeeded" and len(seen) >= 2, (name, seen)
    # The second step was seen waiting before it ran.
    assert "pending" in [s["status"] for s in steps if s["name"] == "second"]
    assert steps[-1] == end["steps"][-1]
