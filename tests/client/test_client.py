"""runyard_client's Runyard and AsyncRunyard against a real server and worker."""

from __future__ import annotations

import asyncio

import pytest

import runyard_client
from runyard_client import client as client_module
from tests.conftest import make_token

pytestmark = pytest.mark.worker


def python_agent(runyard, name: str, function: str, **extra):
    runtime = {"type": "python", "entrypoint": f"tests.agents:{function}"}
    return runyard.agents.create({"name": name, "runtime": runtime, **extra})


def test_run_returns_the_output_or_raises_execution_failed(runyard):
    python_agent(runyard, "echo", "echo")
    python_agent(runyard, "boom", "boom")
    assert runyard.run("echo", {"hello": "world"}, timeout=30)["echo"] == {"hello": "world"}

    with pytest.raises(runyard_client.ExecutionFailed) as failed:
        runyard.run("boom", {}, timeout=30)
    assert failed.value.error_type == "runtime_error"
    assert failed.value.execution["status"] == "failed"
    assert failed.value.hint

    queued = runyard.run("echo", {"n": 1}, wait=False)
    assert queued["status"] in ("queued", "running", "succeeded")
    assert runyard.executions.wait(queued["id"], timeout=30)["output"]["echo"] == {"n": 1}


def test_submit_by_capability_runs_on_an_agent_that_has_it(runyard, base_url, live_org):
    python_agent(runyard, "echo", "echo", capabilities=[{"name": "text.echo", "chains": ["a"]}])
    python_agent(runyard, "other", "echo", capabilities=["text.other"])
    execution = runyard.executions.submit_by_capability("text.echo", {"x": 1}, chain="a")
    assert execution["agent_name"] == "echo"
    assert execution["assigned_by"]["candidates"][0]["agent"] == "echo"
    assert runyard.executions.wait(execution["id"], timeout=30)["output"]["echo"] == {"x": 1}
    with pytest.raises(runyard_client.Conflict):
        runyard.executions.submit_by_capability("text.echo", {}, chain="b")

    async def through_async():
        async with runyard_client.AsyncRunyard(base_url, live_org.token) as client:
            return await client.executions.submit_by_capability("text.other", {"y": 2})

    assert asyncio.run(through_async())["agent_name"] == "other"


def test_send_event_starts_an_event_trigger_once_per_id(runyard):
    python_agent(runyard, "echo", "echo")
    trigger = runyard.call(
        "POST",
        "/triggers",
        json={
            "name": "on-paid",
            "target": {"agent": "echo"},
            "input": {"order": "$.event.data.order_id"},
            "on_event": {"name": "order.paid"},
        },
    )
    assert trigger["on_event"] == {"name": "order.paid", "filter": {}} and trigger["url"] is None
    sent = runyard.send_event("order.paid", {"order_id": "A-1"}, id="order-A-1")
    assert sent["duplicate"] is False and sent["event_id"] == "order-A-1"
    [started] = sent["started"]
    done = runyard.executions.wait(started["execution_id"], timeout=30)
    assert done["output"]["echo"] == {"order": "A-1"}
    again = runyard.send_event("order.paid", {"order_id": "A-1"}, id="order-A-1")
    assert again["duplicate"] is True and again["id"] == sent["id"] and again["started"] == []
    assert [event["id"] for event in runyard.events(name="order.paid")] == [sent["id"]]


def test_errors_are_one_class_per_status_with_the_servers_hint(runyard, base_url, live_org):
    with pytest.raises(runyard_client.NotFound) as missing:
        runyard.agents.get("no-such-agent")
    assert missing.value.status == 404

    with pytest.raises(runyard_client.ValidationError) as invalid:
        runyard.agents.create({"name": "Bad Name!", "runtime": {"type": "python"}})
    assert invalid.value.status == 422 and invalid.value.errors

    python_agent(runyard, "typed", "echo", input_schema={"type": "object", "required": ["a"]})
    with pytest.raises(runyard_client.Unprocessable) as refused:
        runyard.executions.submit("typed", {})
    assert refused.value.errors and refused.value.hint

    with pytest.raises(runyard_client.Conflict):
        python_agent(runyard, "typed", "echo")

    viewer = runyard_client.Runyard(base_url, make_token(live_org, "viewer"))
    with pytest.raises(runyard_client.Forbidden) as forbidden:
        python_agent(viewer, "nope", "echo")
    assert forbidden.value.status == 403 and forbidden.value.hint

    with pytest.raises(runyard_client.Unauthorized):
        runyard_client.Runyard(base_url, "ry_not-a-token").me()


def test_lists_iterate_over_every_page(runyard, monkeypatch):
    for number in range(5):
        python_agent(runyard, f"paged-{number}", "echo")
    monkeypatch.setattr(client_module, "PAGE_SIZE", 2)
    names = [agent["name"] for agent in runyard.agents.list(q="paged")]
    assert sorted(names) == [f"paged-{number}" for number in range(5)]


def test_batch_cancel_rerun_logs_and_the_event_stream(runyard):
    python_agent(runyard, "echo", "echo")
    python_agent(runyard, "reporter", "reporter")
    python_agent(runyard, "waits", "wait_for_cancel")

    ids = runyard.executions.submit_batch("echo", [{"i": 0}, {"i": 1}, {"i": 2}])
    outputs = [runyard.executions.wait(i, timeout=30)["output"]["echo"] for i in ids]
    assert outputs == [{"i": 0}, {"i": 1}, {"i": 2}]
    again = runyard.executions.rerun(ids[0])
    assert again["rerun_of"] == ids[0]
    assert runyard.executions.wait(again["id"], timeout=30)["output"]["echo"] == {"i": 0}
    assert {e["id"] for e in runyard.executions.list(agent="echo")} >= {*ids, again["id"]}

    waiting = runyard.executions.submit("waits", {})
    runyard.executions.cancel(waiting["id"])
    assert runyard.executions.wait(waiting["id"], timeout=30)["status"] == "cancelled"

    execution = runyard.executions.submit("reporter", {"lines": 3, "pause": 0.1})
    events = list(runyard.executions.stream(execution["id"]))
    lines = [e["data"]["message"] for e in events if e["event"] == "log"]
    assert lines == ["line 0", "line 1", "line 2"]
    fractions = [
        (e["data"].get("progress") or {}).get("fraction") for e in events if e["event"] == "status"
    ]
    assert 1.0 in fractions
    assert events[-1]["event"] == "end" and events[-1]["data"]["status"] == "succeeded"
    logged = runyard.executions.logs(execution["id"])
    assert [line["message"] for line in logged] == lines
    resumed = list(runyard.executions.stream(execution["id"], last_event_id=logged[1]["seq"]))
    assert [e["data"]["message"] for e in resumed if e["event"] == "log"] == ["line 2"]


def test_apply_creates_then_patches_only_a_real_change(runyard):
    definition = {
        "name": "applied",
        "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
        "retry": {"max_retries": 1},
        "tags": ["a"],
    }
    assert runyard.agents.apply(definition).action == "created"
    assert runyard.agents.apply(definition).action == "unchanged"
    assert runyard.agents.get("applied")["current_version"] == "1.0.0"

    planned = runyard.agents.apply({**definition, "timeout_seconds": 60}, dry_run=True)
    assert planned.action == "updated" and "timeout_seconds" in planned.diff()
    assert runyard.agents.get("applied")["current_version"] == "1.0.0"
    changed = runyard.agents.apply({**definition, "timeout_seconds": 60})
    assert changed.version == "1.0.1"
    runyard.agents.archive("applied")
    assert runyard.agents.get("applied")["archived_at"]


def test_the_async_client(base_url, live_org, runyard):
    python_agent(runyard, "echo", "echo")
    python_agent(runyard, "reporter", "reporter")

    async def scenario():
        async with runyard_client.AsyncRunyard(base_url, live_org.token) as client:
            outputs = await asyncio.gather(*(client.run("echo", {"i": i}) for i in range(3)))
            names = [agent["name"] async for agent in client.agents.list()]
            execution = await client.executions.submit("reporter", {"lines": 2, "pause": 0.1})
            events = [event async for event in client.executions.stream(execution["id"])]
            with pytest.raises(runyard_client.NotFound):
                await client.agents.get("missing")
            return outputs, names, events

    outputs, names, events = asyncio.run(scenario())
    assert [output["echo"] for output in outputs] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert sorted(names) == ["echo", "reporter"]
    assert events[-1]["event"] == "end" and events[-1]["data"]["status"] == "succeeded"
