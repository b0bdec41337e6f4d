"""Organization quotas checked on submit (max_queued, submit_rate, cpu_seconds_per_day), the
limits `runyard orgs limits` sets, and GET /api/v1/usage. No worker: executions stay queued."""

import datetime as dt
import json
import math
import uuid

import pytest
from sqlalchemy import text

from app.db import db
from app.flow import services as flow
from tests.app.test_batch import BATCH
from tests.app.test_executions_api import make_agent, submit
from tests.app.test_triggers_api import deliver, make_trigger
from tests.test_cli import runyard


def make_chain(client, org):
    """`one-step`: a chain of one echo step."""
    chain = {
        "name": "one-step",
        "input_schema": {"type": "object", "required": ["text"], "properties": {"text": {}}},
        "steps": [{"name": "only", "agent": "echo"}],
    }
    assert client.post("/api/v1/chains", json=chain, headers=org.headers).status_code == 201


def set_limits(org, **changes):
    with db.session() as session:
        flow.set_limits(session, org.name, changes)
        session.commit()


def queued(connection, org) -> int:
    return connection.execute(
        text("SELECT count(*) FROM executions WHERE org_id = :org"), {"org": org.id}
    ).scalar_one()


def assert_quota_refusal(response, limit: str) -> dict:
    body = response.get_json()
    assert response.status_code == 429, body
    assert body["errors"] == {"limit": [limit]} and body["hint"]
    assert int(response.headers["Retry-After"]) >= 1
    return body


def test_usage_shows_no_limits_and_what_waits_where(client, org, other_org):
    make_agent(client, org)
    fresh = client.get("/api/v1/usage", headers=org.headers).get_json()
    assert fresh == {
        "limits": {
            "max_running": None,
            "max_queued": None,
            "submit_rate": None,
            "submit_burst": None,
            "cpu_seconds_per_day": None,
            "weight": 1,
            "retention_days": None,
        },
        "usage": {"running": 0, "queued": 0, "cpu_seconds_today": 0.0},
        "queues": [],
    }
    for _ in range(3):
        assert submit(client, org).status_code == 202
    later = client.get("/api/v1/usage", headers=org.headers).get_json()
    assert later["usage"]["queued"] == 3
    [queue] = later["queues"]
    assert queue["queue"] == "default" and queue["queued"] == 3
    assert 0 <= queue["oldest_queued_age_seconds"] < 60
    theirs = client.get("/api/v1/usage", headers=other_org.headers).get_json()
    assert theirs["usage"]["queued"] == 0 and theirs["queues"] == [], "counts its own only"


def test_max_queued_refuses_the_submit_that_would_pass_it_and_stores_nothing(
    client, org, connection
):
    make_agent(client, org)
    set_limits(org, max_queued=2)
    assert submit(client, org).status_code == 202
    assert submit(client, org).status_code == 202
    body = assert_quota_refusal(submit(client, org), "max_queued")
    assert "max_queued of 2" in body["message"]
    assert queued(connection, org) == 2
    usage = client.get("/api/v1/usage", headers=org.headers).get_json()
    assert usage["limits"]["max_queued"] == 2


def test_a_batch_counts_every_item_against_max_queued(client, org, connection):
    make_agent(client, org)
    set_limits(org, max_queued=3)
    assert submit(client, org).status_code == 202
    items = [{"input": {"text": str(n)}} for n in range(3)]
    response = client.post(BATCH.format(agent="echo"), json={"items": items}, headers=org.headers)
    assert_quota_refusal(response, "max_queued")
    assert queued(connection, org) == 1
    response = client.post(
        BATCH.format(agent="echo"), json={"items": items[:2]}, headers=org.headers
    )
    assert response.status_code == 202
    assert queued(connection, org) == 3


def test_a_batch_larger_than_max_queued_can_never_fit_and_is_422(client, org, connection):
    make_agent(client, org)
    set_limits(org, max_queued=5)
    items = [{"input": {"text": str(n)}} for n in range(6)]
    response = client.post(BATCH.format(agent="echo"), json={"items": items}, headers=org.headers)
    body = response.get_json()
    assert response.status_code == 422 and "/items" in body["errors"], body
    assert "split the batch" in body["hint"]
    assert queued(connection, org) == 0


def test_chain_runs_not_started_count_against_max_queued(client, org, connection):
    make_agent(client, org)
    make_chain(client, org)
    set_limits(org, max_queued=2)
    runs = [
        client.post(
            "/api/v1/chains/one-step/executions", json={"input": {"text": "x"}}, headers=org.headers
        ).status_code
        for _ in range(3)
    ]
    # No worker here: the runs wait with their first step not started.
    assert runs == [202, 202, 429]
    assert_quota_refusal(submit(client, org), "max_queued")
    usage = client.get("/api/v1/usage", headers=org.headers).get_json()["usage"]
    assert usage["queued"] == 2


def test_a_max_queued_refusal_takes_no_token_of_the_submit_rate(client, org, connection):
    make_agent(client, org)
    set_limits(org, max_queued=1, submit_rate=0.01, submit_burst=2)
    assert submit(client, org).status_code == 202
    for _ in range(3):
        assert_quota_refusal(submit(client, org), "max_queued")
    set_limits(org, max_queued=None)
    assert submit(client, org).status_code == 202, "the burst's second token was left"
    assert_quota_refusal(submit(client, org), "submit_rate")


def test_submit_rate_refuses_past_its_burst_with_the_ratelimit_headers(client, org, connection):
    make_agent(client, org)
    set_limits(org, submit_rate=0.5, submit_burst=2)
    assert submit(client, org).status_code == 202
    assert submit(client, org).status_code == 202
    refused = submit(client, org)
    assert_quota_refusal(refused, "submit_rate")
    assert refused.headers["RateLimit-Limit"] == "2"
    assert refused.headers["RateLimit-Remaining"] == "0"
    # About two seconds for the one token a submit needs, four to refill the burst.
    assert int(refused.headers["Retry-After"]) in (1, 2)
    assert int(refused.headers["RateLimit-Reset"]) in (3, 4)
    assert queued(connection, org) == 2


def test_a_batch_is_one_submit_against_the_rate(client, org, connection):
    make_agent(client, org)
    set_limits(org, submit_rate=0.1, submit_burst=1)
    items = [{"input": {"text": str(n)}} for n in range(50)]
    response = client.post(BATCH.format(agent="echo"), json={"items": items}, headers=org.headers)
    assert response.status_code == 202
    assert_quota_refusal(submit(client, org), "submit_rate")
    assert queued(connection, org) == 50


def test_each_organization_has_its_own_rate_budget(client, org, other_org):
    make_agent(client, org)
    make_agent(client, other_org)
    set_limits(org, submit_rate=0.1, submit_burst=1)
    assert submit(client, org).status_code == 202
    assert submit(client, org).status_code == 429
    assert submit(client, other_org).status_code == 202, "no limit: never counted"
    set_limits(other_org, submit_rate=0.1, submit_burst=1)
    assert submit(client, other_org).status_code == 202, "a bucket of its own"


def test_cpu_seconds_per_day_refuses_once_used_until_midnight_utc(client, org, connection):
    agent = make_agent(client, org)
    set_limits(org, cpu_seconds_per_day=1.0)
    assert submit(client, org).status_code == 202
    version_id = connection.execute(
        text("SELECT current_version_id FROM agents WHERE id = :id"), {"id": agent["id"]}
    ).scalar_one()
    # Yesterday's CPU does not count; today's does.
    for finished, cpu in (("now() - interval '1 day'", 50.0), ("now()", 1.25)):
        connection.execute(
            text(
                "INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, "
                "agent_version, status, priority, input, attempt, max_attempts, finished_at, "
                f"resource_usage) VALUES (:id, :org, :agent, :version, 'echo', '1.0.0', "
                f"'succeeded', 5, '{{}}', 1, 1, {finished}, CAST(:usage AS jsonb))"
            ),
            {
                "id": uuid.uuid4(),
                "org": org.id,
                "agent": agent["id"],
                "version": version_id,
                "usage": json.dumps({"cpu_seconds": cpu, "max_rss_mb": 1, "wall_ms": 1}),
            },
        )
    refused = submit(client, org)
    body = assert_quota_refusal(refused, "cpu_seconds_per_day")
    assert "1.2" in body["message"] or "1.3" in body["message"]
    now = dt.datetime.now(dt.UTC)
    midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert abs(int(refused.headers["Retry-After"]) - (midnight - now).total_seconds()) < 5
    usage = client.get("/api/v1/usage", headers=org.headers).get_json()["usage"]
    assert math.isclose(usage["cpu_seconds_today"], 1.25)


def test_chain_submits_webhook_deliveries_and_manual_fires_obey_the_quotas(client, org, connection):
    make_agent(client, org)
    make_chain(client, org)
    trigger = make_trigger(client, org)
    schedule = {"name": "nightly", "target": {"agent": "echo"}, "cron": "0 3 * * *"}
    schedule["input"] = {"text": "x"}
    assert client.post("/api/v1/schedules", json=schedule, headers=org.headers).status_code == 201
    assert submit(client, org).status_code == 202
    set_limits(org, max_queued=1)
    chain_run = client.post(
        "/api/v1/chains/one-step/executions", json={"input": {"text": "x"}}, headers=org.headers
    )
    assert_quota_refusal(chain_run, "max_queued")
    assert_quota_refusal(deliver(client, trigger, {"ticket": {"title": "x"}}), "max_queued")
    fired = client.post("/api/v1/schedules/nightly/trigger", headers=org.headers)
    assert_quota_refusal(fired, "max_queued")
    assert queued(connection, org) == 1
    count = connection.execute(
        text("SELECT count(*) FROM chain_executions WHERE org_id = :org"), {"org": org.id}
    ).scalar_one()
    assert count == 0, "nothing stored for the refused chain"
    set_limits(org, max_queued=None)
    assert deliver(client, trigger, {"ticket": {"title": "y"}}).status_code == 202


def test_a_refused_keyed_submit_leaves_its_key_free(client, org, connection):
    make_agent(client, org)
    set_limits(org, max_queued=1)
    assert submit(client, org).status_code == 202
    headers = {**org.headers, "Idempotency-Key": f"quota-{uuid.uuid4()}"}
    body = {"input": {"text": "later"}}
    path = "/api/v1/agents/echo/executions"
    assert client.post(path, json=body, headers=headers).status_code == 429
    set_limits(org, max_queued=None)
    retried = client.post(path, json=body, headers=headers)
    assert retried.status_code == 202 and "Idempotency-Replayed" not in retried.headers


@pytest.fixture
def cli_org(client):
    """An organization made by the command line (committed, so another process sees it)."""
    name = f"limits-{uuid.uuid4().hex[:8]}"
    created = runyard("orgs", "create", name, "--json")
    assert created.returncode == 0, created.stderr
    yield name, {"Authorization": f"Bearer {json.loads(created.stdout)['token']}"}
    with db.engine.begin() as conn:
        conn.execute(text("DELETE FROM organizations WHERE name = :name"), {"name": name})


def test_orgs_limits_on_the_command_line(client, cli_org):
    name, headers = cli_org
    result = runyard("orgs", "limits", name, "--max-queued", "10", "--submit-rate", "2.5")
    assert result.returncode == 0, result.stderr
    assert "max_queued           10" in result.stdout
    result = runyard("orgs", "limits", name, "--submit-rate", "none", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["max_queued"] == 10 and printed["submit_rate"] is None
    assert printed["max_running"] is None and printed["weight"] == 1
    shown = json.loads(runyard("orgs", "limits", name, "--json").stdout)
    assert shown == printed, "no option: prints only"
    assert client.get("/api/v1/usage", headers=headers).get_json()["limits"] == printed


def test_orgs_limits_sets_max_running_and_weight(client, cli_org):
    name, headers = cli_org
    result = runyard("orgs", "limits", name, "--max-running", "4", "--weight", "3")
    assert result.returncode == 0, result.stderr
    assert "max_running          4" in result.stdout and "weight               3" in result.stdout
    result = runyard("orgs", "limits", name, "--max-running", "none", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["max_running"] is None and printed["weight"] == 3, "weight kept"
    assert client.get("/api/v1/usage", headers=headers).get_json()["limits"] == printed


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--max-queued", "0"], "max_queued must be a whole number above 0"),
        (["--max-queued", "2.5"], "max_queued must be a whole number above 0"),
        (["--submit-rate", "-1"], "submit_rate must be a number above 0"),
        (["--cpu-seconds-per-day", "lots"], "a number, or none"),
        (["--max-running", "0"], "max_running must be a whole number above 0"),
        (["--max-running", "1.5"], "max_running must be a whole number above 0"),
        (["--max-running", "1e12"], "up to 2147483647"),
        (["--submit-rate", "nan"], "submit_rate must be a number above 0"),
        (["--submit-rate", "inf"], "submit_rate must be a number above 0"),
        (["--weight", "0"], "weight must be a whole number from 1 to 1000"),
        (["--weight", "1001"], "weight must be a whole number from 1 to 1000"),
        (["--weight", "2.5"], "weight must be a whole number from 1 to 1000"),
        (["--weight", "none"], "hint: --weight 1 gives it the default share"),
        (["--retention-days", "0"], "retention_days must be a whole number above 0"),
        (["--retention-days", "-7"], "retention_days must be a whole number above 0"),
        (["--retention-days", "1.5"], "retention_days must be a whole number above 0"),
        (["--retention-days", "forever"], "a number, or none"),
    ],
)
def test_orgs_limits_refuses_what_is_not_a_limit(cli_org, args, says):
    result = runyard("orgs", "limits", cli_org[0], *args)
    assert result.returncode == 2 and says in result.stderr
    # Nothing changed, the other options of the command line included.
    shown = json.loads(runyard("orgs", "limits", cli_org[0], "--json").stdout)
    assert shown["max_running"] is None and shown["weight"] == 1


def test_orgs_limits_sets_and_clears_retention_days(client, cli_org):
    name, headers = cli_org
    result = runyard("orgs", "limits", name, "--retention-days", "7")
    assert result.returncode == 0, result.stderr
    assert "retention_days       7" in result.stdout
    assert client.get("/api/v1/usage", headers=headers).get_json()["limits"]["retention_days"] == 7
    result = runyard("orgs", "limits", name, "--retention-days", "none", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["retention_days"] is None


def test_max_running_and_weight_read_back_on_usage(client, org):
    set_limits(org, max_running=8, weight=1000)
    limits = client.get("/api/v1/usage", headers=org.headers).get_json()["limits"]
    assert limits["max_running"] == 8 and isinstance(limits["max_running"], int)
    assert limits["weight"] == 1000
    set_limits(org, max_running=None, weight=1)
    limits = client.get("/api/v1/usage", headers=org.headers).get_json()["limits"]
    assert limits["max_running"] is None and limits["weight"] == 1


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"max_running": 0}, "max_running"),
        ({"max_running": -3}, "max_running"),
        ({"max_running": 2.5}, "max_running"),
        ({"max_running": math.inf}, "max_running"),
        ({"weight": None}, "weight"),
        ({"weight": 0}, "weight"),
        ({"weight": 1001}, "weight"),
        ({"weight": math.nan}, "weight"),
        ({"max_queued": 2**31}, "max_queued"),
        ({"cpu_seconds_per_day": math.nan}, "cpu_seconds_per_day"),
    ],
)
def test_set_limits_refuses_what_no_column_may_hold(org, changes, field):
    from app.errors import ValidationFailed

    with db.session() as session, pytest.raises(ValidationFailed) as refused:
        flow.set_limits(session, org.name, changes)
    assert set(refused.value.errors) == {field}


def test_orgs_limits_of_an_unknown_organization():
    result = runyard("orgs", "limits", f"nobody-{uuid.uuid4().hex[:6]}", "--max-queued", "1")
    assert result.returncode == 2 and "no organization" in result.stderr


def test_new_organizations_take_the_default_limits(client, monkeypatch):
    monkeypatch.setenv("RUNYARD_DEFAULT_MAX_QUEUED", "7")
    monkeypatch.setenv("RUNYARD_DEFAULT_SUBMIT_RATE", "3")
    monkeypatch.setenv("RUNYARD_DEFAULT_MAX_RUNNING", "2")
    monkeypatch.setenv("RUNYARD_DEFAULT_WEIGHT", "5")
    name = f"defaults-{uuid.uuid4().hex[:8]}"
    created = runyard("orgs", "create", name, "--json")
    try:
        assert created.returncode == 0, created.stderr
        token = json.loads(created.stdout)["token"]
        limits = client.get(
            "/api/v1/usage", headers={"Authorization": f"Bearer {token}"}
        ).get_json()["limits"]
        assert limits["max_queued"] == 7 and limits["submit_rate"] == 3.0
        assert limits["max_running"] == 2 and limits["weight"] == 5
        assert limits["cpu_seconds_per_day"] is None
    finally:
        with db.engine.begin() as conn:
            conn.execute(text("DELETE FROM organizations WHERE name = :name"), {"name": name})


def test_without_defaults_a_new_organization_has_no_limit_and_weight_1(monkeypatch):
    from app.config import Config

    for name in ("RUNYARD_DEFAULT_MAX_RUNNING", "RUNYARD_DEFAULT_WEIGHT"):
        monkeypatch.delenv(name, raising=False)
    cfg = Config.from_env()
    assert cfg.default_max_running is None and cfg.default_weight == 1
    monkeypatch.setenv("RUNYARD_DEFAULT_MAX_RUNNING", "none")
    assert Config.from_env().default_max_running is None


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("RUNYARD_DEFAULT_MAX_RUNNING", "0"),
        ("RUNYARD_DEFAULT_MAX_RUNNING", "2.5"),
        ("RUNYARD_DEFAULT_MAX_RUNNING", "3000000000"),
        ("RUNYARD_DEFAULT_SUBMIT_RATE", "nan"),
        ("RUNYARD_DEFAULT_CPU_SECONDS_PER_DAY", "inf"),
        ("RUNYARD_DEFAULT_WEIGHT", "0"),
        ("RUNYARD_DEFAULT_WEIGHT", "1001"),
        ("RUNYARD_DEFAULT_WEIGHT", "none"),
    ],
)
def test_a_default_no_organization_could_hold_stops_the_process_naming_it(monkeypatch, name, raw):
    from app.config import Config

    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=name):
        Config.from_env()
