"""Every `runyard` client command, as a subprocess, against a real server and worker."""

from __future__ import annotations

import json
import shutil
import stat

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.worker

EXAMPLES = ROOT / "examples" / "agents"


def as_json(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_login_saves_a_0600_profile_that_later_commands_use(cli, base_url, live_org, tmp_path):
    result = cli("login", "--url", base_url, "--token", live_org.token, "--json")
    saved = as_json(result)
    path = tmp_path / ".config" / "runyard" / "config.toml"
    assert saved["path"] == str(path) and saved["org"]["name"] == live_org.name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert live_org.token in path.read_text()
    # No RUNYARD_URL / RUNYARD_TOKEN: the profile answers.
    unset = {"RUNYARD_URL": None, "RUNYARD_TOKEN": None}
    assert as_json(cli("agents", "ls", "--json", env=unset)) == []

    refused = cli("login", "--url", base_url, "--token", "ry_wrong")
    assert refused.returncode == 2 and "401" in refused.stderr
    nowhere = cli("agents", "ls", env={**unset, "HOME": "/nonexistent"})
    assert nowhere.returncode == 2 and "runyard login" in nowhere.stderr


def test_apply_the_examples_twice_makes_no_new_version_then_dry_run_and_prune(cli, tmp_path):
    first = as_json(cli("agents", "apply", "-f", str(EXAMPLES), "--json"))
    assert {c["action"] for c in first} == {"created"}
    assert len(first) == len(list(EXAMPLES.glob("*.yaml")))
    second = as_json(cli("agents", "apply", "-f", str(EXAMPLES), "--json"))
    assert {(c["action"], c["version"]) for c in second} == {("unchanged", "1.0.0")}
    readable = cli("agents", "apply", "-f", str(EXAMPLES))
    assert readable.returncode == 0 and "unchanged" in readable.stdout

    folder = tmp_path / "agents"
    shutil.copytree(EXAMPLES, folder)
    (folder / "word-count.yaml").unlink()
    slugify = folder / "slugify.yaml"
    slugify.write_text(slugify.read_text().replace("timeout_seconds: 30", "timeout_seconds: 45"))
    dry = cli("agents", "apply", "-f", str(folder), "--dry-run", "--prune")
    assert dry.returncode == 0, dry.stderr
    assert "-30" in dry.stdout and "+45" in dry.stdout and "archived" in dry.stdout
    assert as_json(cli("agents", "get", "slugify", "--json"))["timeout_seconds"] == 30

    done = {
        c["name"]: c
        for c in as_json(cli("agents", "apply", "-f", str(folder), "--prune", "--json"))
    }
    assert done["slugify"]["action"] == "updated" and done["slugify"]["version"] == "1.0.1"
    assert done["word-count"]["action"] == "archived"
    names = {a["name"] for a in as_json(cli("agents", "ls", "--json"))}
    assert "word-count" not in names and "slugify" in names

    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: robot\nname: x\n")
    refused = cli("agents", "apply", "-f", str(broken))
    assert refused.returncode == 2 and "kind must be agent or chain" in refused.stderr


def test_sync_registers_the_declared_agents_once(cli):
    first = as_json(cli("agents", "sync", "--module", "runyard_examples", "--json"))
    assert {c["name"]: c["action"] for c in first} == {
        "document-word-count": "created",
        "refund-approval": "created",
        "refund-order": "created",
        "summarize-ticket": "created",
        "summarize-tickets": "created",
        "ticket-digest": "created",
        "word-count": "created",
    }
    again = as_json(cli("agents", "sync", "--module", "runyard_examples", "--json"))
    assert {c["action"] for c in again} == {"unchanged"}
    agent = as_json(cli("agents", "get", "summarize-ticket", "--json"))
    assert agent["runtime"]["entrypoint"] == "runyard_examples.text:summarize"
    table = cli("agents", "ls")
    assert table.returncode == 0 and "summarize-ticket" in table.stdout and "NAME" in table.stdout


def test_run_follow_exit_codes_and_json(cli, runyard):
    cli("agents", "apply", "-f", str(EXAMPLES))
    runtime = {"type": "python", "entrypoint": "tests.agents:reporter"}
    runyard.agents.create({"name": "reporter", "runtime": runtime})
    runyard.agents.create(
        {"name": "boom", "runtime": {**runtime, "entrypoint": "tests.agents:boom"}}
    )

    followed = cli("run", "reporter", "--input", '{"lines": 3, "pause": 0.1}', "--follow")
    assert followed.returncode == 0, followed.stderr
    assert all(f"line {n}" in followed.stdout for n in range(3))
    assert '"refused"' in followed.stdout

    events = [
        json.loads(line)
        for line in cli(
            "run", "reporter", "--input", '{"lines": 2, "pause": 0.1}', "--follow", "--json"
        ).stdout.splitlines()
    ]
    assert [e["data"]["message"] for e in events if e.get("event") == "log"] == ["line 0", "line 1"]
    assert events[-1]["status"] == "succeeded"

    source = ROOT / "input.json"
    try:
        source.write_text('{"title": "Hello, Runyard!"}')
        by_file = as_json(cli("run", "slugify", "--input", "@input.json", "--json"))
    finally:
        source.unlink()
    assert by_file["output"] == {"slug": "hello-runyard"}

    sleepy = {**runtime, "entrypoint": "tests.agents:sleepy"}
    runyard.agents.create({"name": "sleepy", "runtime": sleepy, "timeout_seconds": 1})
    timed_out = cli("run", "sleepy", "--input", '{"seconds": 5}', "--follow")
    assert timed_out.returncode == 1 and "timed_out" in timed_out.stdout

    failed = cli("run", "boom", "--follow")
    assert failed.returncode == 1 and "runtime_error" in failed.stdout
    assert cli("run", "boom", "--json").returncode == 1

    assert cli("run", "slugify", "--input", "{not json").returncode == 2
    assert cli("run", "slugify", "--no-such-option").returncode == 2
    invalid = cli("run", "slugify", "--input", "{}")
    assert invalid.returncode == 2 and "title" in invalid.stderr and "hint" in invalid.stderr


def test_executions_logs_chains_and_schedules(cli, runyard, tmp_path):
    runtime = {"type": "python", "entrypoint": "tests.agents:reporter"}
    runyard.agents.create({"name": "reporter", "runtime": runtime})
    runyard.agents.create(
        {"name": "waits", "runtime": {**runtime, "entrypoint": "tests.agents:wait_for_cancel"}}
    )
    done = as_json(cli("run", "reporter", "--input", '{"lines": 2, "pause": 0}', "--json"))

    listed = as_json(cli("executions", "ls", "--agent", "reporter", "--json"))
    assert [e["id"] for e in listed] == [done["id"]]
    assert done["id"][:8] in cli("executions", "ls").stdout
    assert as_json(cli("executions", "get", done["id"], "--json"))["status"] == "succeeded"
    lines = as_json(cli("logs", done["id"], "--json"))
    assert [line["message"] for line in lines] == ["line 0", "line 1"]
    assert "line 1" in cli("logs", done["id"], "-f").stdout
    rerun = as_json(cli("executions", "rerun", done["id"], "--json"))
    assert rerun["rerun_of"] == done["id"]

    waiting = runyard.executions.submit("waits", {})
    assert cli("executions", "cancel", waiting["id"], "--json").returncode == 0
    assert runyard.executions.wait(waiting["id"], timeout=30)["status"] == "cancelled"
    assert cli("executions", "get", waiting["id"], "--json").returncode == 1
    assert cli("executions", "cancel", waiting["id"]).returncode == 2

    chain = tmp_path / "twice.json"
    steps = [
        {"name": "one", "agent": "reporter"},
        {"name": "two", "agent": "reporter", "input": {"lines": 1}},
    ]
    chain.write_text(json.dumps({"kind": "chain", "name": "twice", "steps": steps}))
    created = as_json(cli("agents", "apply", "-f", str(chain), "--json"))
    assert [(c["kind"], c["action"]) for c in created] == [("chain", "created")]
    again = as_json(cli("agents", "apply", "-f", str(chain), "--json"))
    assert [(c["action"], c["version"]) for c in again] == [("unchanged", "1.0.0")]
    assert [c["name"] for c in as_json(cli("chains", "ls", "--json"))] == ["twice"]
    chain_run = as_json(
        cli("chains", "run", "twice", "--input", '{"lines": 1, "pause": 0}', "--json")
    )
    assert chain_run["status"] == "succeeded"

    runyard.call(
        "POST",
        "/schedules",
        json={
            "name": "nightly",
            "target": {"agent": "reporter"},
            "cron": "0 2 * * *",
            "input": {"lines": 1, "pause": 0},
        },
    )
    assert [s["name"] for s in as_json(cli("schedules", "ls", "--json"))] == ["nightly"]
    assert as_json(cli("schedules", "pause", "nightly", "--json"))["enabled"] is False
    assert as_json(cli("schedules", "resume", "nightly", "--json"))["enabled"] is True
    assert cli("schedules", "trigger", "nightly", "--json").returncode == 0
    history = as_json(cli("schedules", "history", "nightly", "--json"))
    assert len(history) == 1
    assert "nightly" in cli("schedules", "ls").stdout
