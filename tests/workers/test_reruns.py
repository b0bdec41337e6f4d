"""Reruns on a real worker: a rerun runs like a submit (same or new input, each version
choice), waits for a concurrency slot like one (`waiting_for`), and a chain rerun reuses the
outputs before its point without running those steps' agents again (a ledger proves it)."""

import time

import pytest
from sqlalchemy import text

from app.db import db
from tests.conftest import wait_for, wait_until
from tests.workers.test_chains_runs import agent, read, wait_chain

pytestmark = pytest.mark.worker

LEDGER_IN = {"type": "object", "required": ["ledger"]}


def rerun(client, org, execution_id, **body):
    return client.post(f"/api/v1/executions/{execution_id}/rerun", json=body, headers=org.headers)


def submit(client, org, name, payload):
    response = client.post(
        f"/api/v1/agents/{name}/executions", json={"input": payload}, headers=org.headers
    )
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def ledger_lines(path):
    return path.read_text().split("\n")[:-1] if path.exists() else []


def test_a_rerun_runs_with_the_same_or_a_new_input_and_each_version(
    live_client, live_org, other_live_org, tmp_path
):
    ledger = tmp_path / "ledger.txt"
    agent(live_client, live_org, "ledger", "tests.agents:ledger", input_schema=LEDGER_IN)
    original = submit(live_client, live_org, "ledger", {"ledger": str(ledger), "n": 1})
    assert wait_for(live_client, live_org, original)["status"] == "succeeded"
    same = rerun(live_client, live_org, original).get_json()
    done = wait_for(live_client, live_org, same["id"])
    assert done["status"] == "succeeded" and done["output"] == {"n": 1}
    assert done["rerun_of"] == original and done["input"] == {"ledger": str(ledger), "n": 1}
    new_input = rerun(live_client, live_org, original, input={"ledger": str(ledger), "n": 7})
    assert wait_for(live_client, live_org, new_input.get_json()["id"])["output"] == {"n": 7}
    assert [line.split()[0] for line in ledger_lines(ledger)] == [
        original,
        same["id"],
        new_input.get_json()["id"],
    ]
    patched = live_client.patch(
        "/api/v1/agents/ledger",
        json={"description": "x", "timeout_seconds": 30},
        headers=live_org.headers,
    )
    assert patched.status_code == 200, patched.get_json()
    current = patched.get_json()["current_version"]
    assert current != "1.0.0"
    for version, expected in (("same", "1.0.0"), ("current", current), ("1.0.0", "1.0.0")):
        response = rerun(live_client, live_org, original, version=version)
        assert response.status_code == 202, response.get_json()
        finished = wait_for(live_client, live_org, response.get_json()["id"])
        assert (finished["status"], finished["agent_version"]) == ("succeeded", expected)
    bad = rerun(live_client, live_org, original, input={"n": 1})
    assert bad.status_code == 422 and "/input" in bad.get_json()["errors"]
    assert rerun(live_client, other_live_org, original).status_code == 404


def test_a_running_original_is_409_and_a_rerun_waits_for_a_concurrency_slot(
    live_client, live_org, tmp_path
):
    agent(
        live_client,
        live_org,
        "sleepy",
        "tests.agents:sleepy",
        concurrency={"limit": 1},
    )
    quick = submit(live_client, live_org, "sleepy", {"seconds": 0.05})
    assert wait_for(live_client, live_org, quick)["status"] == "succeeded"
    slow = submit(live_client, live_org, "sleepy", {"seconds": 3})
    wait_until(
        lambda: (
            live_client.get(f"/api/v1/executions/{slow}", headers=live_org.headers).get_json()[
                "status"
            ]
            == "running"
        )
    )
    running = rerun(live_client, live_org, slow)
    assert running.status_code == 409 and running.get_json()["hint"]
    waiting = rerun(live_client, live_org, quick)
    assert waiting.status_code == 202, waiting.get_json()
    body = waiting.get_json()
    assert body["waiting_for"] == "agent_concurrency" and body["rerun_of"] == quick
    time.sleep(0.3)
    still = live_client.get(f"/api/v1/executions/{body['id']}", headers=live_org.headers)
    assert still.get_json()["status"] == "queued", "no slot while the slow one runs"
    finished = wait_for(live_client, live_org, body["id"])
    assert finished["status"] == "succeeded"
    assert finished["started_at"] >= wait_for(live_client, live_org, slow)["finished_at"]


def test_a_bulk_rerun_runs_every_id_it_answers(live_client, live_org, tmp_path):
    ledger = tmp_path / "ledger.txt"
    agent(live_client, live_org, "ledger", "tests.agents:ledger", input_schema=LEDGER_IN)
    originals = [
        submit(live_client, live_org, "ledger", {"ledger": str(ledger), "n": n}) for n in range(3)
    ]
    for execution_id in originals:
        wait_for(live_client, live_org, execution_id)
    response = live_client.post(
        "/api/v1/executions/rerun", json={"filter": {"agent": "ledger"}}, headers=live_org.headers
    )
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["matched"] == 3 and len(body["ids"]) == 3
    outputs = [wait_for(live_client, live_org, i)["output"] for i in body["ids"]]
    assert sorted(o["n"] for o in outputs) == [0, 1, 2]
    assert len(ledger_lines(ledger)) == 6


def make_flagged_chain(client, org):
    agent(client, org, "ledger", "tests.agents:ledger", input_schema=LEDGER_IN)
    agent(client, org, "gate", "tests.agents:fails_until_flag")
    agent(client, org, "after", "tests.agents:ledger", input_schema=LEDGER_IN)
    body = {
        "name": "flagged",
        "input_schema": {
            "type": "object",
            "required": ["ledger", "flag", "after"],
            "properties": {
                **{name: {"type": "string"} for name in ("ledger", "flag", "after")},
                "seconds": {"type": "number"},
            },
        },
        "steps": [
            {
                "name": "first",
                "agent": "ledger",
                "input": {"ledger": "$.input.ledger", "n": 5, "seconds": "$.input.seconds"},
            },
            {
                "name": "gate",
                "agent": "gate",
                "input": {"flag": "$.input.flag", "value": "$.steps.first.output.n"},
            },
            {"name": "last", "agent": "after", "input": {"ledger": "$.input.after", "n": 9}},
        ],
    }
    response = client.post("/api/v1/chains", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()


def chain_rerun(client, org, chain_execution_id, **body):
    return client.post(
        f"/api/v1/chain-executions/{chain_execution_id}/rerun", json=body, headers=org.headers
    )


def test_a_chain_rerun_from_the_failed_step_reuses_the_steps_before_it(
    live_client, live_org, other_live_org, tmp_path
):
    ledger, after, flag = tmp_path / "first.txt", tmp_path / "after.txt", tmp_path / "flag"
    make_flagged_chain(live_client, live_org)
    payload = {"ledger": str(ledger), "flag": str(flag), "after": str(after)}
    response = live_client.post(
        "/api/v1/chains/flagged/executions", json={"input": payload}, headers=live_org.headers
    )
    original = response.get_json()["id"]
    failed = wait_chain(live_client, live_org, original)
    assert failed["status"] == "failed"
    assert [s["status"] for s in failed["steps"]] == ["succeeded", "failed", "skipped"]
    assert len(ledger_lines(ledger)) == 1 and not after.exists()
    assert chain_rerun(live_client, other_live_org, original).status_code == 404
    bad = chain_rerun(live_client, live_org, original, **{"from": "nope"})
    assert bad.status_code == 422 and "/from" in bad.get_json()["errors"]
    flag.write_text("")
    response = chain_rerun(live_client, live_org, original)
    assert response.status_code == 202, response.get_json()
    rerun_body = response.get_json()
    assert rerun_body["rerun_of"] == original
    assert rerun_body["steps"][0]["status"] == "reused"
    done = wait_chain(live_client, live_org, rerun_body["id"])
    assert done["status"] == "succeeded", done
    assert [s["status"] for s in done["steps"]] == ["reused", "succeeded", "succeeded"]
    # The reused step's agent did not run again: its ledger still has the original's one line.
    assert len(ledger_lines(ledger)) == 1 and len(ledger_lines(after)) == 1
    reused = live_client.get(
        f"/api/v1/executions/{done['steps'][0]['execution_id']}", headers=live_org.headers
    ).get_json()
    assert reused["output"] == {"n": 5} and reused["attempts"] == 0
    assert reused["rerun_of"] == failed["steps"][0]["execution_id"]
    gate = live_client.get(
        f"/api/v1/executions/{done['steps'][1]['execution_id']}", headers=live_org.headers
    ).get_json()
    assert gate["input"] == {"flag": str(flag), "value": 5}, "fed the reused output"
    again = chain_rerun(live_client, live_org, done["id"])
    assert again.status_code == 422, "no step failed"
    # Retention deletes the original: the links read null, the reused step still reads reused.
    with db.engine.begin() as conn:
        conn.execute(text("DELETE FROM chain_executions WHERE id = :id"), {"id": original})
    kept = read(live_client, live_org, done["id"])
    assert kept["rerun_of"] is None and kept["steps"][0]["status"] == "reused"
    orphan = live_client.get(
        f"/api/v1/executions/{done['steps'][0]['execution_id']}", headers=live_org.headers
    ).get_json()
    assert orphan["rerun_of"] is None and orphan["output"] == {"n": 5}


def test_a_chain_rerun_from_a_named_step_and_while_running(live_client, live_org, tmp_path):
    ledger, after, flag = tmp_path / "first.txt", tmp_path / "after.txt", tmp_path / "flag"
    flag.write_text("")
    make_flagged_chain(live_client, live_org)
    payload = {"ledger": str(ledger), "flag": str(flag), "after": str(after), "seconds": 1.5}
    response = live_client.post(
        "/api/v1/chains/flagged/executions", json={"input": payload}, headers=live_org.headers
    )
    original = response.get_json()["id"]
    # The first step sleeps 1.5 s: the chain is under way, and is not rerun.
    assert read(live_client, live_org, original)["status"] in ("queued", "running")
    early = chain_rerun(live_client, live_org, original, **{"from": "last"})
    assert early.status_code == 409 and early.get_json()["hint"]
    assert wait_chain(live_client, live_org, original)["status"] == "succeeded"
    lines = len(ledger_lines(ledger))
    response = chain_rerun(live_client, live_org, original, **{"from": "last"})
    assert response.status_code == 202, response.get_json()
    done = wait_chain(live_client, live_org, response.get_json()["id"])
    assert [s["status"] for s in done["steps"]] == ["reused", "reused", "succeeded"]
    assert len(ledger_lines(ledger)) == lines, "the first step did not run again"
    from_start = chain_rerun(live_client, live_org, original, **{"from": "first"})
    done = wait_chain(live_client, live_org, from_start.get_json()["id"])
    assert [s["status"] for s in done["steps"]] == ["succeeded"] * 3
    assert len(ledger_lines(ledger)) == lines + 1


def test_a_reused_step_is_never_compensated_and_a_compensated_one_never_reused(
    live_client, live_org, tmp_path
):
    ledger, flag, undo = tmp_path / "first.txt", tmp_path / "flag", tmp_path / "undo.txt"
    agent(live_client, live_org, "ledger", "tests.agents:ledger", input_schema=LEDGER_IN)
    agent(live_client, live_org, "gate", "tests.agents:fails_until_flag")
    body = {
        "name": "undone",
        "input_schema": {
            "type": "object",
            "required": ["ledger", "flag", "undo"],
            "properties": {name: {"type": "string"} for name in ("ledger", "flag", "undo")},
        },
        "steps": [
            {
                "name": "first",
                "agent": "ledger",
                "input": {"ledger": "$.input.ledger"},
                "compensate": {"agent": "ledger", "input": {"ledger": "$.input.undo"}},
            },
            {"name": "gate", "agent": "gate", "input": {"flag": "$.input.flag"}},
        ],
        "on_failure": "stop",
    }
    assert (
        live_client.post("/api/v1/chains", json=body, headers=live_org.headers).status_code == 201
    )
    payload = {"ledger": str(ledger), "flag": str(flag), "undo": str(undo)}
    flag.write_text("")
    ok = live_client.post(
        "/api/v1/chains/undone/executions", json={"input": payload}, headers=live_org.headers
    ).get_json()["id"]
    assert wait_chain(live_client, live_org, ok)["status"] == "succeeded"
    # Rerun from the gate, which now fails: `first` is reused, so there is nothing to undo.
    flag.unlink()
    response = chain_rerun(live_client, live_org, ok, **{"from": "gate"})
    assert response.status_code == 202, response.get_json()
    failed = wait_chain(live_client, live_org, response.get_json()["id"])
    assert failed["status"] == "failed" and failed["compensations"] == []
    assert [s["status"] for s in failed["steps"]] == ["reused", "failed"]
    assert not undo.exists() and len(ledger_lines(ledger)) == 1
    # A chain that ran `first` itself compensates it, and then `first` is not reused.
    ran = chain_rerun(live_client, live_org, failed["id"], **{"from": "first"}).get_json()
    stopped = wait_chain(live_client, live_org, ran["id"])
    assert [s["status"] for s in stopped["compensations"]] == ["succeeded"]
    assert len(ledger_lines(undo)) == 1
    refused = chain_rerun(live_client, live_org, stopped["id"])
    assert refused.status_code == 422
    assert "compensated" in refused.get_json()["errors"]["/from"][0]
