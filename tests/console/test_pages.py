"""The console's pages through the Flask test client: sign-in, sessions, CSRF, roles, 404s, and
every page readable as plain HTML (no JavaScript runs here)."""

import re
import uuid

from sqlalchemy import text

from tests.app.test_executions_api import make_agent, submit
from tests.conftest import make_token
from tests.console.helpers import csrf_of, page_csrf, sign_in

CHAIN = {
    "name": "pipeline",
    "input_schema": {
        "type": "object",
        "required": ["text"],
        "properties": {"text": {"type": "string"}},
    },
    "steps": [
        {"name": "first", "agent": "echo", "input": {"text": "$.input.text"}},
        {"name": "second", "agent": "echo", "input": {"text": "$.input.text"}},
    ],
}
SCHEDULE = {
    "name": "nightly",
    "cron": "0 3 * * *",
    "target": {"agent": "echo"},
    "input": {"text": "hi"},
}


def world(client, org) -> dict:
    """An agent, an execution, a chain execution and a schedule of `org`, through the API."""
    make_agent(client, org)
    execution = submit(client, org, {"text": "hello from the page"}).get_json()
    chain = client.post("/api/v1/chains", json=CHAIN, headers=org.headers)
    assert chain.status_code == 201, chain.get_json()
    run = client.post(
        "/api/v1/chains/pipeline/executions", json={"input": {"text": "x"}}, headers=org.headers
    )
    assert run.status_code == 202, run.get_json()
    schedule = client.post("/api/v1/schedules", json=SCHEDULE, headers=org.headers)
    assert schedule.status_code == 201, schedule.get_json()
    return {"execution": execution["id"], "chain_execution": run.get_json()["id"]}


def test_without_a_session_every_page_sends_to_the_sign_in_form(client):
    response = client.get("/ui/executions?status=failed")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/ui/login?next=")
    form = client.get("/ui/login").get_data(as_text=True)
    assert 'name="token"' in form and "csrf_token" in form


def test_sign_in_sets_a_session_cookie_that_holds_no_token(client, org, connection):
    response = sign_in(client, org.token)
    assert response.status_code == 302 and response.headers["Location"] == "/ui/"
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if c.startswith("runyard_ui="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and org.token not in cookie
    session_id = re.match(r"runyard_ui=([^;]+)", cookie).group(1)
    row = connection.execute(text("SELECT session_hash, role, org_id FROM ui_sessions")).one()
    assert session_id not in row.session_hash and row.role == "admin" and row.org_id == org.id
    assert client.get("/ui/").status_code == 200


def test_a_bad_token_is_refused_on_the_form(client):
    response = sign_in(client, "not-a-token")
    assert response.status_code == 401
    assert "invalid or revoked token" in response.get_data(as_text=True)
    assert client.get("/ui/").status_code == 302


def test_sign_in_without_its_csrf_token_is_403(client, org):
    client.get("/ui/login")
    assert client.post("/ui/login", data={"token": org.token}).status_code == 403


def test_sign_out_ends_the_session(client, org, connection):
    sign_in(client, org.token)
    csrf = page_csrf(client, "/ui/")
    response = client.post("/ui/logout", data={"csrf_token": csrf})
    assert response.status_code == 302
    assert client.get("/ui/").status_code == 302
    assert connection.execute(text("SELECT count(*) FROM ui_sessions")).scalar() == 0


def test_a_revoked_token_ends_its_sessions(client, org, connection):
    sign_in(client, org.token)
    assert client.get("/ui/agents").status_code == 200
    connection.execute(
        text("UPDATE api_tokens SET revoked_at = now() WHERE org_id = :o"), {"o": org.id}
    )
    assert client.get("/ui/agents").status_code == 302


def test_every_page_reads_as_plain_html(client, org):
    ids = world(client, org)
    sign_in(client, org.token)
    pages = [
        "/ui/",
        "/ui/agents",
        "/ui/agents/echo",
        "/ui/agents/echo?window=7d",
        "/ui/executions",
        "/ui/executions?status=queued&agent=echo&since=2020-01-01&page=1",
        f"/ui/executions/{ids['execution']}",
        f"/ui/executions/{ids['execution']}/live",
        "/ui/chains",
        "/ui/chains/pipeline",
        f"/ui/chain-executions/{ids['chain_execution']}",
        "/ui/schedules",
        "/ui/schedules/nightly",
        "/ui/workers",
        "/ui/notifications",
    ]
    for path in pages:
        response = client.get(path)
        assert response.status_code == 200, (path, response.get_data(as_text=True)[:800])
        assert response.mimetype == "text/html"
    execution = client.get(f"/ui/executions/{ids['execution']}").get_data(as_text=True)
    # Readable without script: the input, the status as a text label, UTC times.
    assert "hello from the page" in execution and "queued" in execution
    assert re.search(r'<time datetime="[^"]+">\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</time>', execution)
    # While queued, the live part polls; a Cancel button for an admin.
    assert 'hx-trigger="every 1s"' in execution and ">Cancel</button>" in execution
    chain = client.get(f"/ui/chain-executions/{ids['chain_execution']}").get_data(as_text=True)
    assert "first" in chain and "second" in chain and "stage 0" in chain
    assert 'hx-select="#chain-live"' in chain  # queued: the page follows it
    listed = client.get("/ui/executions?q=echo").get_data(as_text=True)
    assert ids["execution"] in listed
    found = client.get(f"/ui/executions?q={ids['execution']}")
    assert found.status_code == 302 and ids["execution"] in found.headers["Location"]


def test_empty_pages_say_what_to_do_next(client, org):
    sign_in(client, org.token)
    assert "Create one with" in client.get("/ui/agents").get_data(as_text=True)
    assert "No executions yet" in client.get("/ui/").get_data(as_text=True)
    assert "POST /api/v1/schedules" in client.get("/ui/schedules").get_data(as_text=True)


def test_another_organizations_objects_are_a_404_page(client, org, other_org):
    ids = world(client, other_org)
    sign_in(client, org.token)
    for path in (
        f"/ui/executions/{ids['execution']}",
        f"/ui/executions/{ids['execution']}/live",
        f"/ui/chain-executions/{ids['chain_execution']}",
        "/ui/agents/echo",
        "/ui/chains/pipeline",
        "/ui/schedules/nightly",
        f"/ui/executions/{uuid.uuid4()}",
        "/ui/executions/not-an-id",
        "/ui/no-such-page",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.mimetype == "text/html" and "Not found" in response.get_data(as_text=True)
    csrf = page_csrf(client, "/ui/")
    for path in (
        f"/ui/executions/{ids['execution']}/cancel",
        f"/ui/executions/{ids['execution']}/rerun",
        "/ui/schedules/nightly/pause",
    ):
        assert client.post(path, data={"csrf_token": csrf}).status_code == 404, path


def test_a_form_post_without_csrf_is_403_and_changes_nothing(client, org, connection):
    ids = world(client, org)
    sign_in(client, org.token)
    for data in ({}, {"csrf_token": "forged"}):
        response = client.post(f"/ui/executions/{ids['execution']}/cancel", data=data)
        assert response.status_code == 403
    status = connection.execute(
        text("SELECT status FROM executions WHERE id = :id"), {"id": ids["execution"]}
    ).scalar()
    assert status == "queued"


def test_cancel_from_the_page(client, org, connection):
    ids = world(client, org)
    sign_in(client, org.token)
    csrf = page_csrf(client, f"/ui/executions/{ids['execution']}")
    response = client.post(f"/ui/executions/{ids['execution']}/cancel", data={"csrf_token": csrf})
    assert response.status_code == 303
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "cancelled" in page and ">Rerun</button>" in page and "hx-trigger" not in page


def test_a_viewer_sees_no_buttons_and_its_posts_are_refused(client, org, connection):
    ids = world(client, org)
    sign_in(client, make_token(org, "viewer"))
    page = client.get(f"/ui/executions/{ids['execution']}").get_data(as_text=True)
    assert ">Cancel</button>" not in page and ">Rerun</button>" not in page
    schedule = client.get("/ui/schedules/nightly").get_data(as_text=True)
    assert ">Pause</button>" not in schedule and ">Trigger now</button>" not in schedule
    assert "<h2>Run</h2>" not in client.get("/ui/agents/echo").get_data(as_text=True)
    csrf = csrf_of(page)
    for path in (
        f"/ui/executions/{ids['execution']}/cancel",
        "/ui/schedules/nightly/pause",
        "/ui/agents/echo/run",
    ):
        response = client.post(path, data={"csrf_token": csrf, "text": "x"})
        assert response.status_code == 403, path
        assert "may not do this" in response.get_data(as_text=True)
    status = connection.execute(
        text("SELECT status FROM executions WHERE id = :id"), {"id": ids["execution"]}
    ).scalar()
    assert status == "queued"


def test_the_run_form_shows_errors_next_to_their_fields(client, org):
    make_agent(client, org)
    sign_in(client, org.token)
    form = client.get("/ui/agents/echo").get_data(as_text=True)
    assert 'name="text"' in form and 'name="count"' in form
    csrf = csrf_of(form)
    response = client.post("/ui/agents/echo/run", data={"csrf_token": csrf, "count": "0"})
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    text_field = re.search(r'<div class="field" id="field-text">(.*?)</div>', html, re.S).group(1)
    count_field = re.search(r'<div class="field" id="field-count">(.*?)</div>', html, re.S).group(1)
    assert "field-error" in text_field and "required" in text_field
    assert "field-error" in count_field and "minimum" in count_field
    assert 'value="0"' in count_field  # what was typed stays
    ok = client.post("/ui/agents/echo/run", data={"csrf_token": csrf, "text": "hi", "count": "2"})
    assert ok.status_code == 303 and "/ui/executions/" in ok.headers["Location"]
    run = client.get(ok.headers["Location"]).get_data(as_text=True)
    assert "&#34;count&#34;: 2" in run or '"count": 2' in run


def test_schedule_pause_resume_from_the_page(client, org):
    world(client, org)
    sign_in(client, org.token)
    csrf = page_csrf(client, "/ui/schedules/nightly")
    response = client.post("/ui/schedules/nightly/pause", data={"csrf_token": csrf})
    assert response.status_code == 303
    page = client.get("/ui/schedules/nightly").get_data(as_text=True)
    assert "paused" in page and ">Resume</button>" in page
    client.post("/ui/schedules/nightly/resume", data={"csrf_token": csrf})
    assert ">Pause</button>" in client.get("/ui/schedules/nightly").get_data(as_text=True)


def test_sign_in_only_redirects_within_the_console(client, org):
    page = client.get("/ui/login?next=//evil.example/")
    response = client.post(
        "/ui/login",
        data={
            "token": org.token,
            "next": "//evil.example/",
            "csrf_token": csrf_of(page.get_data(as_text=True)),
        },
    )
    assert response.headers["Location"] == "/ui/"


def test_text_postgresql_cannot_store_is_a_422_page_not_a_500(client, org):
    make_agent(client, org)
    sign_in(client, org.token)
    for path in ("/ui/executions?agent=a%00b", "/ui/executions?q=%00", "/ui/agents/a%00b"):
        response = client.get(path)
        assert response.status_code == 422, path
        assert "cannot be stored" in response.get_data(as_text=True)
    csrf = page_csrf(client, "/ui/agents/echo")
    response = client.post("/ui/agents/echo/run", data={"csrf_token": csrf, "text": "a\x00b"})
    assert response.status_code == 422


def test_over_https_the_session_cookie_is_secure(client, org):
    https = "https://localhost"
    page = client.get("/ui/login", base_url=https).get_data(as_text=True)
    response = client.post(
        "/ui/login", data={"token": org.token, "csrf_token": csrf_of(page)}, base_url=https
    )
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if c.startswith("runyard_ui="))
    assert "Secure" in cookie and "HttpOnly" in cookie


def test_the_overview_shows_activity_queues_and_workers(client, org, connection):
    make_agent(client, org)
    waiting = submit(client, org, {"text": "waits"}).get_json()
    done = submit(client, org, {"text": "fails"}).get_json()
    # One execution ended a moment ago: past the tally's watermark, read from executions.
    connection.execute(
        text(
            "UPDATE executions SET status = 'failed', attempt = 1, started_at = now(), "
            "finished_at = now() WHERE id = :id"
        ),
        {"id": done["id"]},
    )
    sign_in(client, org.token)
    page = client.get("/ui/").get_data(as_text=True)
    # Four charts (per minute and failure rate, last hour and last day), each with a text
    # summary for screen readers and its figures as a table.
    assert page.count('<svg class="chart" role="img" aria-label="') == 4
    assert page.count("as a table</summary>") == 4
    assert "Executions per minute: highest 1, latest 1" in page
    assert "Failure rate: highest 100%, latest 100%" in page
    assert "1 finished, 1 failed or timed out (100.0%)" in page
    # The queue table: one queued execution on the default queue, its oldest wait.
    queues = page.split('id="queues"')[1].split("</section>")[0]
    assert "<th>Oldest wait</th>" in queues
    assert re.search(r"<td>default</td><td>1</td><td>\d+ ms</td>", queues), queues
    assert waiting["id"] in page  # latest executions
    # Workers: loaded after the page (asking them can take a second), a link without script.
    assert 'hx-get="/ui/overview/workers"' in page and 'href="/ui/workers"' in page
    workers = client.get("/ui/overview/workers")
    assert workers.status_code == 200
    fragment = workers.get_data(as_text=True)
    assert "busy slots" in fragment or "No worker answered" in fragment
    assert ">Flower</a>" in fragment


def test_the_overview_says_so_when_no_worker_answers(client, org, monkeypatch):
    from app.fleet import services as fleet

    monkeypatch.setattr(fleet, "list_workers", lambda principal, offset, limit: ([], 0))
    sign_in(client, org.token)
    fragment = client.get("/ui/overview/workers").get_data(as_text=True)
    assert "No worker answered" in fragment and ">Flower</a>" in fragment


def test_the_agent_page_diffs_two_versions(client, org):
    make_agent(client, org)
    schema = {
        "type": "object",
        "required": ["text"],
        "properties": {"text": {"type": "string"}, "shout": {"type": "boolean"}},
    }
    changed = client.patch(
        "/api/v1/agents/echo",
        json={"input_schema": schema, "changelog": "optional shout"},
        headers=org.headers,
    ).get_json()
    new = changed["current_version"]
    assert new != "1.0.0"
    sign_in(client, org.token)
    page = client.get("/ui/agents/echo").get_data(as_text=True)
    assert 'name="from"' in page and 'name="to"' in page
    assert "<option selected>1.0.0</option>" in page and f"<option selected>{new}</option>" in page
    assert '<pre class="diff">' not in page  # until asked
    assert "Executions by status" in page and "Duration (ms)" in page
    diff = client.get(f"/ui/agents/echo?from=1.0.0&to={new}").get_data(as_text=True)
    assert '<span class="diff-file">--- echo 1.0.0</span>' in diff
    assert f'<span class="diff-file">+++ echo {new}</span>' in diff
    assert re.search(r'<span class="diff-add">\+ +&#34;shout&#34;: \{</span>', diff), diff
    assert re.search(r'<span class="diff-del">- +&#34;additionalProperties&#34;: false', diff)
    assert "No breaking change for callers of 1.0.0." in diff and "optional shout" in diff
    # Back the other way, the input refuses unlisted properties again, and `shout` with them.
    back = client.get(f"/ui/agents/echo?from={new}&to=1.0.0").get_data(as_text=True)
    assert "<code>/input_schema/additionalProperties</code>: refuses properties it" in back
    assert "<code>/input_schema/properties/shout</code>: no longer accepts &#39;shout&#39;" in back
    same = client.get("/ui/agents/echo?from=1.0.0&to=1.0.0").get_data(as_text=True)
    assert "The two definitions are the same." in same
    assert client.get("/ui/agents/echo?from=1.0.0&to=9.9.9").status_code == 404


def test_the_schedules_page_lists_the_webhook_triggers(client, org, other_org):
    sign_in(client, org.token)
    assert "No webhook triggers" in client.get("/ui/schedules").get_data(as_text=True)
    make_agent(client, org)
    hook = {"name": "on-ticket", "target": {"agent": "echo"}, "input": {"text": "$.event.t"}}
    created = client.post("/api/v1/triggers", json=hook, headers=org.headers).get_json()
    theirs = {**hook, "name": "their-hook"}
    make_agent(client, other_org)
    assert (
        client.post("/api/v1/triggers", json=theirs, headers=other_org.headers).status_code == 201
    )
    page = client.get("/ui/schedules").get_data(as_text=True)
    assert "on-ticket" in page and f"/hooks/{created['id']}" in page and "agent echo" in page
    assert "their-hook" not in page
    assert created["secret"] not in page


def test_the_chain_page_draws_its_steps_as_a_graph(client, org):
    make_agent(client, org)
    text_in = {"text": "$.input.text"}
    chain = {
        "name": "fanout",
        "input_schema": CHAIN["input_schema"],
        "steps": [
            {
                "name": "fetch",
                "agent": "echo",
                "input": text_in,
                "compensate": {"agent": "echo", "input": text_in},
            },
            {
                "name": "both",
                "parallel": [
                    {"name": "left", "agent": "echo", "version": "1.0.0", "input": text_in},
                    {"name": "right", "agent": "echo", "input": text_in},
                ],
            },
            {"name": "report", "agent": "echo", "input": text_in},
        ],
    }
    created = client.post("/api/v1/chains", json=chain, headers=org.headers)
    assert created.status_code == 201, created.get_json()
    sign_in(client, org.token)
    page = client.get("/ui/chains/fanout").get_data(as_text=True)
    graph = page[page.index('<div class="graph"') : page.index("<details>")]
    # One column per stage, the parallel steps stacked in theirs, an arrow between stages.
    assert graph.count('<div class="graph-stage stage">') == 3
    assert graph.count('<svg class="graph-arrow"') == 2
    stages = graph.split('<div class="graph-stage stage">')[1:]
    assert [s.count('class="step graph-step"') for s in stages] == [1, 2, 1]
    assert "stage 1 · 2 in parallel" in stages[1] and "left" in stages[1] and "right" in stages[1]
    assert "fetch" in stages[0] and "report" in stages[2]
    assert "undo: agent echo" in stages[0] and "undo" not in stages[2]
    assert "1.0.0" in stages[1]  # a pinned version is shown
    # The numbered list stays, folded, for whoever reads it better as text.
    assert "<summary>The steps as a list</summary>" in page and "<ol><li>" in page


def test_the_chain_execution_page_draws_its_stages_with_their_status(client, org):
    ids = world(client, org)
    sign_in(client, org.token)
    page = client.get(f"/ui/chain-executions/{ids['chain_execution']}").get_data(as_text=True)
    assert '<div class="graph" id="stages"' in page
    assert page.count('class="step graph-step"') == 2
    assert page.count('<svg class="graph-arrow"') == 1
    assert "agent</span> echo" in page  # from the plan, also for a step not run yet


def test_the_execution_page_shows_its_attempts_as_a_timeline(client, org, connection):
    make_agent(client, org)
    done = submit(client, org, {"text": "twice"}).get_json()
    # Attempt 1 failed and was retried (as recorded in execution_attempts); attempt 2, the
    # execution row itself, succeeded. The queue wait: 2 s before attempt 1 started.
    connection.execute(
        text(
            "UPDATE executions SET status = 'succeeded', attempt = 2, "
            "queued_at = now() - interval '10 seconds', "
            "started_at = now() - interval '4 seconds', finished_at = now() WHERE id = :id"
        ),
        {"id": done["id"]},
    )
    connection.execute(
        text(
            "INSERT INTO execution_attempts (execution_id, attempt, status, worker, started_at,"
            " finished_at) VALUES (:id, 1, 'failed', 'w1', now() - interval '8 seconds',"
            " now() - interval '6 seconds')"
        ),
        {"id": done["id"]},
    )
    sign_in(client, org.token)
    for path in (f"/ui/executions/{done['id']}", f"/ui/executions/{done['id']}/live"):
        page = client.get(path).get_data(as_text=True)
        timeline = page[
            page.index('<svg class="timeline"') : page.index(
                "</svg>", page.index('<svg class="timeline"')
            )
        ]
        assert 'aria-label="2 attempt(s) over 10.0 s, waited 2000 ms in the queue"' in timeline
        assert timeline.count('<g class="tl-attempt">') == 2
        assert '<rect class="tl-bar tl-failed"' in timeline
        assert '<rect class="tl-bar tl-succeeded"' in timeline
        assert ">failed</text>" in timeline and ">succeeded</text>" in timeline
        assert timeline.count('class="tl-wait"') == 1 and "waited 2000 ms" in timeline
        assert timeline.count(" UTC</text>") == 2
        assert "<th>Worker</th>" in page  # the table stays
    # The bars sit on the shared axis: attempt 1 at 2/10 of it, attempt 2 from 6/10 to the end.
    bars = re.findall(r'<rect class="tl-bar tl-\w+" x="([\d.]+)" y="\d+" width="([\d.]+)"', page)
    assert [(round(float(x)), round(float(w))) for x, w in bars] == [(176, 112), (400, 224)]


def test_a_queued_execution_has_no_timeline_yet(client, org):
    ids = world(client, org)
    sign_in(client, org.token)
    page = client.get(f"/ui/executions/{ids['execution']}").get_data(as_text=True)
    assert 'class="timeline"' not in page and "No attempt yet" in page


def test_the_overview_charts_say_their_times_are_utc(client, org):
    sign_in(client, org.token)
    page = client.get("/ui/").get_data(as_text=True)
    assert re.search(
        r'<div class="chart-range muted"><span>[^<]+ UTC</span><span>[^<]+ UTC</span>', page
    )


def test_the_agents_list_shows_health_success_rate_and_p95(client, org, connection):
    from app.stats import tally

    make_agent(client, org)
    execution = submit(client, org, {"text": "x"}).get_json()
    connection.execute(
        text(
            "UPDATE executions SET status = 'succeeded', attempt = 1, "
            "started_at = queued_at + interval '10 ms', "
            "finished_at = queued_at + interval '130 ms' WHERE id = :id"
        ),
        {"id": execution["id"]},
    )
    tally.tally(lag_seconds=0)
    sign_in(client, org.token)
    page = client.get("/ui/agents").get_data(as_text=True)
    assert "Health (24h)" in page and "healthy" in page and "100.0%" in page
    assert re.search(r"<td>1[23]\d ms</td>", page), page  # p95 of one 120 ms run, in a bucket
