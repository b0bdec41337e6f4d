"""The console (/ui/) signed in as another organization: every page or form that names an object
answers the 404 page and changes nothing; the list of such routes is checked against the app's."""

from __future__ import annotations

from tests.console.helpers import page_csrf, sign_in
from tests.hostile.conftest import Route, app_routes, fill
from tests.hostile.test_tenancy import snapshot

CONSOLE_OBJECT_ROUTES = {
    Route("/ui/agents/<name>", "GET"),
    Route("/ui/agents/<name>/run", "POST"),
    Route("/ui/executions/<execution_id>", "GET"),
    Route("/ui/executions/<execution_id>/live", "GET"),
    Route("/ui/executions/<execution_id>/cancel", "POST"),
    Route("/ui/executions/<execution_id>/rerun", "POST"),
    Route("/ui/chains/<name>", "GET"),
    Route("/ui/chain-executions/<execution_id>", "GET"),
    Route("/ui/chain-executions/<execution_id>/rerun", "POST"),
    Route("/ui/schedules/<name>", "GET"),
    Route("/ui/schedules/<name>/<action>", "POST"),
}
# Not objects: the static files and the catch-all 404 page.
NOT_OBJECTS = {Route("/ui/static/<path:filename>", "GET"), Route("/ui/<path:unknown>", "GET")}


def test_every_console_object_route_is_covered(app):
    routes = {r for r in app_routes(app) if r.rule.startswith("/ui/") and r.arguments}
    assert routes == CONSOLE_OBJECT_ROUTES | NOT_OBJECTS


def test_another_organizations_session_gets_the_404_page_everywhere(client, org, other_org, world):
    before = snapshot(client, org, world)
    by_segment = {
        "agents": {"name": world.agent["name"]},
        "executions": {"execution_id": world.execution["id"]},
        "chains": {"name": world.chain["name"]},
        "chain-executions": {"execution_id": world.chain_execution["id"]},
        "schedules": {"name": world.schedule["name"], "action": "pause"},
    }
    sign_in(client, other_org.token)
    csrf = page_csrf(client, "/ui/")
    for route in sorted(CONSOLE_OBJECT_ROUTES, key=lambda r: (r.rule, r.method)):
        path = fill(route, by_segment[route.rule.split("/")[2]])
        if route.method == "GET":
            response = client.get(path)
        else:
            response = client.post(path, data={"csrf_token": csrf, "text": "theirs"})
        assert response.status_code == 404, (route, response.status_code)
        assert "Not found" in response.get_data(as_text=True), route
    assert snapshot(client, org, world) == before
