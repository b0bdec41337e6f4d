"""The catalog: public agents of every organization, listed for all, run by any as the
caller's own executions; the owner sees only how often."""

from sqlalchemy import text

from tests.app.test_executions_api import ECHO
from tests.app.test_quotas import assert_quota_refusal, set_limits
from tests.conftest import bearer, make_token, wait_for

PUBLIC = {**ECHO, "visibility": "public", "description": "says it back", "capabilities": ["nlp"]}
CATALOG = "/api/v1/catalog"


def publish(client, org, body=PUBLIC) -> dict:
    response = client.post("/api/v1/agents", json=body, headers=org.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def run(client, caller, owner, agent="echo", **body):
    return client.post(
        f"{CATALOG}/{owner.name}/{agent}/executions",
        json={"input": {"text": "hi"}, **body},
        headers=caller.headers,
    )


def test_only_an_admin_makes_an_agent_public(client, org):
    developer = bearer(make_token(org, "developer"))
    refused = client.post("/api/v1/agents", json=PUBLIC, headers=developer)
    assert refused.status_code == 403 and "agents:publish" in refused.get_json()["message"]
    private = client.post("/api/v1/agents", json=ECHO, headers=developer)
    assert private.status_code == 201 and private.get_json()["visibility"] == "private"
    patch = client.patch("/api/v1/agents/echo", json={"visibility": "public"}, headers=developer)
    assert patch.status_code == 403
    made = client.patch("/api/v1/agents/echo", json={"visibility": "public"}, headers=org.headers)
    assert made.status_code == 200 and made.get_json()["visibility"] == "public"
    assert made.get_json()["current_version"] == "1.0.0", "not versioned"
    # Taking it out of the catalog again is any writer's to do; so is re-sending `public`
    # for an agent that is public already.
    again = client.patch("/api/v1/agents/echo", json={"visibility": "public"}, headers=developer)
    assert again.status_code == 200
    hidden = client.patch("/api/v1/agents/echo", json={"visibility": "private"}, headers=developer)
    assert hidden.status_code == 200 and hidden.get_json()["visibility"] == "private"
    bad = client.patch("/api/v1/agents/echo", json={"visibility": "everyone"}, headers=org.headers)
    assert bad.status_code == 422 and "/visibility" in bad.get_json()["errors"]


def test_the_catalog_lists_public_live_agents_of_every_organization(client, org, other_org):
    publish(client, org)
    publish(client, org, {**ECHO, "name": "hidden"})
    publish(client, org, {**PUBLIC, "name": "gone"})
    assert client.delete("/api/v1/agents/gone", headers=org.headers).status_code == 204
    viewer = bearer(make_token(other_org, "viewer"))
    response = client.get(CATALOG, headers=viewer)
    assert response.status_code == 200 and "X-Pagination" in response.headers
    entries = [e for e in response.get_json() if e["org"] == org.name]
    assert entries == [
        {
            "org": org.name,
            "name": "echo",
            "description": "says it back",
            "input_schema": ECHO["input_schema"],
            "output_schema": {"type": "object"},
            "current_version": "1.0.0",
            "capabilities": ["nlp"],
        }
    ]
    assert "runtime" not in response.get_data(as_text=True)
    for query, found in [
        ({"q": "says"}, True),
        ({"q": "nothing-like-it"}, False),
        ({"capability": "nlp"}, True),
        ({"capability": "vision"}, False),
    ]:
        listed = client.get(CATALOG, query_string=query, headers=viewer).get_json()
        assert any(e["org"] == org.name for e in listed) is found, query


def test_a_catalog_run_is_the_callers_execution(client, org, other_org, connection):
    publish(client, org)
    response = run(client, other_org, org, priority=7)
    assert response.status_code == 202, response.get_json()
    execution = response.get_json()
    assert execution["agent_name"] == "echo" and execution["priority"] == 7
    row = connection.execute(
        text("SELECT org_id FROM executions WHERE id = :id"), {"id": execution["id"]}
    ).one()
    assert row.org_id == other_org.id
    path = f"/api/v1/executions/{execution['id']}"
    assert client.get(path, headers=other_org.headers).status_code == 200
    assert [e["id"] for e in client.get("/api/v1/executions", headers=other_org.headers).json] == [
        execution["id"]
    ]
    # The owner sees how often, never the run itself.
    assert client.get(path, headers=org.headers).status_code == 404
    assert client.get(f"{path}/logs", headers=org.headers).status_code == 404
    assert client.get("/api/v1/executions", headers=org.headers).get_json() == []
    listed = client.get("/api/v1/executions", query_string={"agent": "echo"}, headers=org.headers)
    assert listed.get_json() == []
    assert client.get("/api/v1/agents/echo", headers=org.headers).get_json()["catalog_runs"] == 1
    # The owner's own runs are not catalog runs.
    assert run(client, org, org).status_code == 202
    assert (
        client.post(
            "/api/v1/agents/echo/executions", json={"input": {"text": "x"}}, headers=org.headers
        ).status_code
        == 202
    )
    assert client.get("/api/v1/agents/echo", headers=org.headers).get_json()["catalog_runs"] == 1


def test_a_catalog_run_checks_the_input_and_the_version(client, org, other_org):
    publish(client, org)
    invalid = run(client, other_org, org, input={"text": 1})
    assert invalid.status_code == 422 and "/input/text" in invalid.get_json()["errors"]
    assert run(client, other_org, org, version="1.0.0").status_code == 202
    missing = run(client, other_org, org, version="9.9.9")
    assert missing.status_code == 404 and "catalog" in missing.get_json()["hint"]
    viewer = bearer(make_token(other_org, "viewer"))
    refused = client.post(
        f"{CATALOG}/{org.name}/echo/executions", json={"input": {"text": "x"}}, headers=viewer
    )
    assert refused.status_code == 403


def test_private_archived_and_unknown_agents_are_404(client, org, other_org):
    publish(client, org, {**ECHO, "name": "private"})
    assert run(client, other_org, org, agent="private").status_code == 404
    # Its owner may run it through the catalog path too: its own agent, not a catalog run.
    assert run(client, org, org, agent="private").status_code == 202
    owner_view = client.get("/api/v1/agents/private", headers=org.headers).get_json()
    assert owner_view["catalog_runs"] == 0
    assert run(client, other_org, org, agent="nobody").status_code == 404
    assert run(client, other_org, other_org, agent="echo").status_code == 404
    publish(client, org)
    assert run(client, other_org, org).status_code == 202
    client.patch("/api/v1/agents/echo", json={"visibility": "private"}, headers=org.headers)
    hidden = run(client, other_org, org)  # the target cache knows it was public: re-checked
    assert hidden.status_code == 404 and hidden.get_json()["hint"]
    client.patch("/api/v1/agents/echo", json={"visibility": "public"}, headers=org.headers)
    assert run(client, other_org, org).status_code == 202
    assert client.delete("/api/v1/agents/echo", headers=org.headers).status_code == 204
    assert run(client, other_org, org).status_code == 404
    assert client.get(CATALOG, query_string={"q": "says"}, headers=other_org.headers).json == []


def test_catalog_runs_count_against_the_callers_quotas(client, org, other_org):
    publish(client, org)
    set_limits(org, max_queued=1)  # the owner's: no bearing on the caller's runs
    assert run(client, other_org, org).status_code == 202
    assert run(client, other_org, org).status_code == 202
    set_limits(other_org, max_queued=2)
    assert_quota_refusal(run(client, other_org, org), "max_queued")
    set_limits(other_org, max_queued=None, max_running=1)
    assert run(client, other_org, org).get_json()["waiting_for"] is None
    assert run(client, other_org, org).get_json()["waiting_for"] == "org_max_running"


def test_the_caller_reruns_a_catalog_run_while_it_is_public(client, org, other_org, connection):
    publish(client, org)
    original = run(client, other_org, org).get_json()
    connection.execute(
        text("UPDATE executions SET status = 'failed', finished_at = now() WHERE id = :id"),
        {"id": original["id"]},
    )
    path = f"/api/v1/executions/{original['id']}/rerun"
    again = client.post(path, json={}, headers=other_org.headers)
    assert again.status_code == 202, again.get_json()
    assert again.get_json()["rerun_of"] == original["id"]
    assert client.get("/api/v1/agents/echo", headers=org.headers).get_json()["catalog_runs"] == 2
    # Bulk reruns leave catalog runs out (each is rerun on its own, where `public` is checked).
    bulk = client.post(
        "/api/v1/executions/rerun", json={"dry_run": True}, headers=other_org.headers
    )
    assert bulk.get_json() == {"matched": 0}
    client.patch("/api/v1/agents/echo", json={"visibility": "private"}, headers=org.headers)
    assert client.post(path, json={}, headers=other_org.headers).status_code == 404


def test_a_worker_runs_a_catalog_run_to_success(live_client, live_org, other_live_org):
    publish(live_client, live_org)
    execution = run(live_client, other_live_org, live_org, input={"text": "shared"}).get_json()
    done = wait_for(live_client, other_live_org, execution["id"])
    assert done["status"] == "succeeded", done
    assert done["output"]["echo"] == {"text": "shared"}
    path = f"/api/v1/executions/{execution['id']}"
    assert live_client.get(f"{path}/logs", headers=other_live_org.headers).status_code == 200
    assert live_client.get(path, headers=live_org.headers).status_code == 404
    owner_view = live_client.get("/api/v1/agents/echo", headers=live_org.headers).get_json()
    assert owner_view["catalog_runs"] == 1


def test_the_tally_counts_a_catalog_run_for_the_organization_that_ran_it(
    client, org, other_org, connection
):
    """Each organization's rows: the owner's stats count its own runs, and the caller's
    figures (its activity, its metrics) count the runs it made, catalog ones included."""
    from app.stats import tally

    publish(client, org)
    theirs = run(client, other_org, org).get_json()
    ours = client.post(
        "/api/v1/agents/echo/executions", json={"input": {"text": "x"}}, headers=org.headers
    ).get_json()
    connection.execute(
        text(
            "UPDATE executions SET status = 'succeeded', attempt = 1, "
            "started_at = now() - interval '2 minutes', finished_at = now() - interval '1 minute' "
            "WHERE id = ANY(:ids)"
        ),
        {"ids": [theirs["id"], ours["id"]]},
    )
    tally.tally(lag_seconds=0)
    counted = connection.execute(
        text(
            "SELECT org_id, sum(succeeded) FROM agent_stats_rollups "
            "WHERE agent_id = :agent AND span_seconds = 60 GROUP BY org_id"
        ),
        {"agent": theirs["agent_id"]},
    ).all()
    assert dict(counted) == {org.id: 1, other_org.id: 1}
    stats = client.get("/api/v1/agents/echo/stats", headers=org.headers).get_json()
    assert stats["counts"]["succeeded"] == 1


def test_the_callers_console_page_of_a_catalog_run_names_the_owner(client, org, other_org):
    from tests.console.helpers import sign_in

    publish(client, org)
    execution = run(client, other_org, org).get_json()
    sign_in(client, other_org.token)
    page = client.get(f"/ui/executions/{execution['id']}").get_data(as_text=True)
    assert f"{org.name}/echo (from the catalog)" in page
    assert "/ui/agents/echo" not in page  # the caller has no such agent page


def test_a_catalog_run_is_audited_in_the_callers_trail(client, org, other_org):
    publish(client, org)
    execution = run(client, other_org, org).get_json()
    query = {"action": "execution.submit"}
    theirs = client.get("/api/v1/audit", query_string=query, headers=other_org.headers).get_json()
    assert [event["object"]["id"] for event in theirs] == [execution["id"]]
    ours = client.get("/api/v1/audit", query_string=query, headers=org.headers).get_json()
    assert ours == []
    assert execution["created_by"]["token_id"] is not None
