"""The console in a real browser (Playwright driving the system's Chromium) against a real
`runyard api` and a real worker: sign-in, live logs without a reload, cancel and rerun, roles,
another organization's 404, the run form's errors, a chain execution's stages. No request may
leave the host, and every page visited is saved under .runyard/screenshots/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.app.test_events_live import api  # noqa: F401 (the live `runyard api` fixture)
from tests.conftest import ROOT, make_token, wait_for
from tests.workers.test_runs import python_agent, run, script_agent

pytestmark = pytest.mark.worker

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / ".runyard" / "screenshots"

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not CHROMIUM.exists():
        pytest.skip(f"chromium not found at {CHROMIUM}: apt-get install -y chromium")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def base(api) -> str:  # noqa: F811
    return f"http://{api[0]}:{api[1]}"


@pytest.fixture
def page(browser) -> Iterator:
    """A fresh browser context whose every request must go to 127.0.0.1 (else it is aborted
    and the test fails)."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    outside: list[str] = []

    def guard(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    yield context.new_page()
    context.close()
    assert outside == [], f"requests left the host: {outside}"


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page, base: str, token: str) -> None:
    page.goto(f"{base}/ui/")
    assert urlsplit(page.url).path == "/ui/login"
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/ui/")


def test_sign_in_and_sign_out(page, base, live_org):
    page.goto(f"{base}/ui/executions")
    assert urlsplit(page.url).path == "/ui/login"
    shot(page, "login")
    page.fill("input[name=token]", "wrong")
    page.click("button[type=submit]")
    assert "invalid or revoked token" in page.content()
    page.fill("input[name=token]", live_org.token)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/ui/executions"))  # back where it was going
    shot(page, "executions-empty")
    page.click("text=Sign out")
    page.wait_for_url(re.compile(r"/ui/login"))
    page.goto(f"{base}/ui/")
    assert urlsplit(page.url).path == "/ui/login"


def test_logs_and_status_appear_without_a_reload_then_rerun(page, base, live_client, live_org):
    python_agent(live_client, live_org, "reporter", "reporter")
    execution_id = run(live_client, live_org, "reporter", {"lines": 8, "pause": 0.5})
    sign_in(page, base, live_org.token)
    page.goto(f"{base}/ui/executions/{execution_id}")
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads
    page.wait_for_selector("#logs >> text=line 2", timeout=15_000)
    assert "line 7" not in page.inner_text("#logs")  # still running: not all there yet
    assert re.search(r"\d+% line \d of 8", page.inner_text("#live .progress"))  # ctx.progress
    shot(page, "execution-running")
    page.wait_for_selector("#live .status-succeeded", timeout=20_000)
    assert "line 7" in page.inner_text("#logs")
    assert "running" not in page.inner_text("#attempts")  # the attempt's end shows too
    assert page.evaluate("window.loadedOnce") is True
    # Cancel goes with the poll that brought the end (waited for, not read at once: the
    # assertion must not race the swap).
    page.wait_for_selector("button:has-text('Cancel')", state="detached", timeout=5_000)
    shot(page, "execution-succeeded")
    page.click("button:has-text('Rerun')")
    page.wait_for_url(lambda url: execution_id not in urlsplit(url).path)
    assert "rerun of" in page.content() and execution_id in page.content()
    new_id = urlsplit(page.url).path.rsplit("/", 1)[-1]
    assert wait_for(live_client, live_org, new_id)["status"] == "succeeded"


def test_cancel_from_the_page(page, base, live_client, live_org):
    python_agent(live_client, live_org, "waiter", "wait_for_cancel")
    execution_id = run(live_client, live_org, "waiter", {"seconds": 20})
    sign_in(page, base, live_org.token)
    page.goto(f"{base}/ui/executions/{execution_id}")
    page.wait_for_selector("#live .status-running", timeout=15_000)
    page.click("button:has-text('Cancel')")
    page.wait_for_selector("#live .status-cancelled", timeout=15_000)
    shot(page, "execution-cancelled")
    assert wait_for(live_client, live_org, execution_id)["status"] == "cancelled"


def test_a_viewer_sees_no_buttons_and_its_post_is_refused(page, base, live_client, live_org):
    python_agent(live_client, live_org, "echo", "echo")
    execution_id = run(live_client, live_org, "echo", {"a": 1})
    wait_for(live_client, live_org, execution_id)
    sign_in(page, base, make_token(live_org, "viewer"))
    page.goto(f"{base}/ui/executions/{execution_id}")
    assert page.locator("button", has_text="Rerun").count() == 0
    assert page.locator("button", has_text="Cancel").count() == 0
    assert page.locator("text=Run").locator("xpath=ancestor::form").count() == 0
    shot(page, "execution-viewer")
    csrf = page.input_value("input[name=csrf_token]")  # the sign-out form's
    refused = page.request.post(
        f"{base}/ui/executions/{execution_id}/rerun", form={"csrf_token": csrf}
    )
    assert refused.status == 403


def test_another_organizations_execution_is_a_404_page(
    page, base, live_client, live_org, other_live_org
):
    python_agent(live_client, other_live_org, "echo", "echo")
    theirs = run(live_client, other_live_org, "echo", {"a": 1})
    sign_in(page, base, live_org.token)
    response = page.goto(f"{base}/ui/executions/{theirs}")
    assert response.status == 404 and "Not found" in page.content()
    shot(page, "not-found")


def test_the_run_form_shows_errors_next_to_fields(page, base, live_client, live_org):
    schema = {
        "type": "object",
        "required": ["text"],
        "properties": {
            "text": {"type": "string", "description": "what to echo"},
            "count": {"type": "integer", "minimum": 1},
            "loud": {"type": "boolean"},
        },
    }
    python_agent(live_client, live_org, "echo", "echo", input_schema=schema)
    sign_in(page, base, live_org.token)
    page.goto(f"{base}/ui/agents/echo")
    page.fill("#in-count", "0")
    page.click("button:has-text('Run')")
    page.wait_for_selector("#field-text .field-error")
    assert "required" in page.inner_text("#field-text .field-error")
    assert "minimum" in page.inner_text("#field-count .field-error")
    shot(page, "agent-run-errors")
    page.fill("#in-text", "hello")
    page.fill("#in-count", "2")
    page.click("button:has-text('Run')")
    page.wait_for_url(re.compile(r"/ui/executions/"))
    page.wait_for_selector("#live .status-succeeded", timeout=20_000)
    assert '"count": 2' in page.inner_text("main")
    page.goto(f"{base}/ui/agents/echo")
    shot(page, "agent")


def test_a_chain_executions_page_follows_its_steps_by_status(page, base, live_client, live_org):
    python_agent(live_client, live_org, "sleepy", "sleepy")
    python_agent(live_client, live_org, "echo", "echo")
    chain = {
        "name": "nap",
        "input_schema": {"type": "object"},
        "steps": [{"name": "first", "agent": "sleepy"}, {"name": "second", "agent": "echo"}],
    }
    created = live_client.post("/api/v1/chains", json=chain, headers=live_org.headers)
    assert created.status_code == 201, created.get_json()
    sign_in(page, base, live_org.token)
    started = live_client.post(
        "/api/v1/chains/nap/executions", json={"input": {"seconds": 3}}, headers=live_org.headers
    )
    chain_execution_id = started.get_json()["id"]
    page.goto(f"{base}/ui/chain-executions/{chain_execution_id}")
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads
    steps = page.locator(".step")
    assert steps.count() == 2
    assert "succeeded" not in steps.nth(1).inner_text()
    shot(page, "chain-execution-running")
    page.wait_for_function(
        "document.querySelectorAll('#stages .status-succeeded').length === 2", timeout=20_000
    )
    # The chain's own status follows too, and the polling stops once it ended.
    page.wait_for_function(
        "document.querySelector('#chain-live .summary .status-succeeded') !== null",
        timeout=20_000,
    )
    assert page.locator("#chain-live[hx-get]").count() == 0
    assert page.evaluate("window.loadedOnce") is True
    for index in range(2):
        assert "succeeded" in steps.nth(index).inner_text()  # a text label, not colour alone
    shot(page, "chain-execution")
    page.goto(f"{base}/ui/chains/nap")
    shot(page, "chain")


def test_every_list_page_in_the_browser(page, base, live_client, live_org):
    python_agent(live_client, live_org, "echo", "echo")
    wait_for(live_client, live_org, run(live_client, live_org, "echo", {"a": 1}))
    sign_in(page, base, live_org.token)
    time_zone_shown = page.locator("time").first.inner_text()
    assert "UTC" not in time_zone_shown  # localized by the page's script
    for name in ("", "agents", "executions", "chains", "schedules", "workers", "notifications"):
        response = page.goto(f"{base}/ui/{name}")
        assert response.status == 200, name
        if not name:  # the overview's workers section arrives after the page
            page.locator("#workers", has_text="busy slots").wait_for()
        shot(page, name or "overview")
    page.goto(f"{base}/ui/workers")
    assert page.locator("tbody tr").count() >= 1  # the test worker answered
    worker = page.locator("tbody tr td a").first  # each worker links to its page in Flower
    assert unquote(worker.get_attribute("href")).endswith(f"/worker/{worker.inner_text()}")
    assert page.locator("a", has_text="Flower").get_attribute("href").startswith("http://")


def test_the_agent_page_compares_two_versions(page, base, live_client, live_org):
    python_agent(live_client, live_org, "echo", "echo")
    wait_for(live_client, live_org, run(live_client, live_org, "echo", {"a": 1}))
    changed = live_client.patch(
        "/api/v1/agents/echo", json={"timeout_seconds": 45}, headers=live_org.headers
    )
    assert changed.status_code == 200, changed.get_json()
    sign_in(page, base, live_org.token)
    page.goto(f"{base}/ui/agents/echo")
    page.click("text=Show the diff")
    page.locator("pre.diff").wait_for()
    assert page.locator("pre.diff .diff-add").count() >= 1
    assert page.locator("pre.diff .diff-del").count() >= 1
    shot(page, "agent")


def test_a_durable_execution_shows_its_wait_then_its_journal(page, base, live_client, live_org):
    """The page follows a parent through `waiting` to its end without a reload, and lists its
    journal with links to its children; a child links back to its parent."""
    python_agent(live_client, live_org, "double", "double")
    python_agent(live_client, live_org, "waiter", "waits_for_event")
    script_agent(
        live_client,
        live_org,
        "gatherer",
        "def main(input, ctx):\n"
        "    outs = ctx.wait([ctx.start('double', {'n': n}) for n in range(3)])\n"
        "    ctx.run('waiter', {'event': 'page.go'})\n"
        "    return {'outs': outs}\n",
    )
    execution_id = run(live_client, live_org, "gatherer", {})
    sign_in(page, base, live_org.token)
    page.goto(f"{base}/ui/executions/{execution_id}")
    page.wait_for_selector("#live .big .status-waiting", timeout=20_000)
    page.wait_for_selector("#journal >> text=waiter", timeout=20_000)
    shot(page, "execution-waiting")
    response = live_client.post(
        "/api/v1/events", json={"name": "page.go", "data": {}}, headers=live_org.headers
    )
    assert response.status_code == 202
    page.wait_for_selector("#live .big .status-succeeded", timeout=20_000)
    journal = page.inner_text("#journal")
    assert "4 durable calls" in journal and "4 children" in journal
    shot(page, "execution-durable")
    page.click("#journal >> text=waiter")
    page.wait_for_selector("text=child of", timeout=10_000)
    assert execution_id in page.content()
