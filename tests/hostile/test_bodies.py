"""Hostile bodies on every route that takes one: nesting, size, server-owned fields."""

from __future__ import annotations

import json

import pytest

from tests.app.test_triggers_api import signed
from tests.hostile.conftest import (
    BODY_METHODS,
    Route,
    app_routes,
    assert_error_shape,
    fill,
    finish_world,
    hook_headers,
)

JSON = {"Content-Type": "application/json"}
DEEP_ARRAYS = "[" * 100_000 + "]" * 100_000
DEEP_OBJECTS = '{"a":' * 100_000 + "1" + "}" * 100_000
# Fields every stored object has and no client may set, beside each route's own (see below).
ALWAYS_SERVER_OWNED = {"id", "org_id", "status", "attempt", "created_at", "updated_at"}
# POST routes that act and take no body (anything sent is ignored, never parsed).
BODYLESS = {
    Route("/api/v1/executions/<execution_id>/cancel", "POST"),
    Route("/api/v1/chain-executions/<execution_id>/cancel", "POST"),
    Route("/api/v1/schedules/<ref>/pause", "POST"),
    Route("/api/v1/schedules/<ref>/resume", "POST"),
    Route("/api/v1/schedules/<ref>/trigger", "POST"),
    Route("/api/v1/notifications/<notification_id>/deliveries/<event_id>/redeliver", "POST"),
    Route("/api/v1/decisions/<decision_id>/approve", "POST"),
    Route("/api/v1/decisions/<decision_id>/reject", "POST"),
}
HOOK = Route("/hooks/<trigger_id>", "POST")
# The body's `id` is the sender's id of the event (its dedupe key), not a Runyard id.
TAKES_AN_ID = {Route("/api/v1/events", "POST")}
# Routes whose body is a file, of any media type (app/http.py RawBody): any bytes are a valid
# body, up to a limit of their own. test_a_file_body_is_any_bytes_up_to_its_own_limit.
RAW = {Route("/api/v1/documents", "POST")}
# The console's forms take form fields, not JSON, and are not in the spec: tests/console and
# tests/hostile/test_console_tenancy.py cover them.
CONSOLE = "/ui/"


def json_routes(app) -> list[Route]:
    return [route for route in app_routes(app) if not route.rule.startswith(CONSOLE)]


def spec_path(route: Route) -> str:
    return route.rule.replace("<", "{").replace(">", "}")


def body_routes(app) -> list[Route]:
    """The routes that take a JSON body."""
    return [
        route
        for route in json_routes(app)
        if route.method in BODY_METHODS and route not in BODYLESS and route not in RAW
    ]


def test_every_write_route_is_classified(app, client):
    """A new POST/PATCH route must say whether it takes a body: the spec and BODYLESS agree."""
    spec = client.get("/api/v1/openapi.json").get_json()["paths"]
    for route in json_routes(app):
        if route.method not in BODY_METHODS:
            continue
        operation = spec[spec_path(route)][route.method.lower()]
        takes_body = "requestBody" in operation or route == HOOK
        assert takes_body == (route not in BODYLESS), route


def _post(client, route, world, org, data: str | bytes):
    raw = data.encode() if isinstance(data, str) else data
    headers = hook_headers(world, raw) if route == HOOK else {**org.headers, **JSON}
    return client.open(
        fill(route, world.values_for(route)), method=route.method, data=raw, headers=headers
    )


@pytest.mark.parametrize("nested", [DEEP_ARRAYS, DEEP_OBJECTS], ids=["arrays", "objects"])
def test_deeply_nested_json_is_400_on_every_body_route(app, client, org, world, nested):
    routes = body_routes(app)
    assert HOOK in routes and len(routes) >= 9
    for route in routes:
        assert_error_shape(_post(client, route, world, org, nested), 400)


def test_oversized_body_is_413_on_every_body_route(app, client, org, world):
    big = json.dumps({"input": {"blob": "x" * (1024 * 1024 + 1)}})
    for route in body_routes(app):
        assert_error_shape(_post(client, route, world, org, big), 413)


def test_a_file_body_is_any_bytes_up_to_its_own_limit(client, org, world):
    """Nested JSON, NUL escapes, binary: a file is not parsed; past RUNYARD_MAX_DOCUMENT_MB
    (not RUNYARD_MAX_BODY_BYTES) it is a 413 in the error shape."""
    import dataclasses

    from app.config import current_config, use_config

    [route] = RAW
    for data in (DEEP_ARRAYS.encode(), b'{"a": "\\u0000"}', bytes(range(256))):
        for content_type in ("application/json", "application/octet-stream"):
            response = client.post(
                route.rule,
                query_string={"name": "file"},
                data=data,
                headers={**org.headers, "Content-Type": content_type},
            )
            assert response.status_code == 201, response.get_json()
    configured = current_config()
    use_config(dataclasses.replace(configured, max_document_mb=2))
    try:
        for size, status in ((2 * 1024 * 1024 + 1, 413), (1024 * 1024 + 1, 201)):
            response = client.post(
                route.rule, query_string={"name": "big"}, data=b"x" * size, headers=org.headers
            )
            assert response.status_code == status, response.get_json()
        assert_error_shape(
            client.post(
                route.rule, query_string={"name": "big"}, data=b"x" * (3 << 20), headers=org.headers
            ),
            413,
        )
    finally:
        use_config(configured)


def test_bodyless_routes_never_parse_what_is_sent(client, org, world):
    """A nested or oversized body on a bodyless action is ignored, never a 500."""
    for route in sorted(BODYLESS, key=lambda r: r.rule):
        for data in (DEEP_ARRAYS, "x" * (1024 * 1024 + 1)):
            response = _post(client, route, world, org, data)
            assert response.status_code < 500, (route, response.get_json())


def valid_bodies(world) -> dict[Route, dict]:
    """A body each create/update route accepts, so one extra field is the only fault."""
    target = {"agent": world.agent["name"]}
    return {
        Route("/api/v1/agents", "POST"): {
            "name": "fresh",
            "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
        },
        Route("/api/v1/agents/<ref>", "PATCH"): {"description": "changed"},
        Route("/api/v1/agents/<ref>/executions", "POST"): {"input": {}},
        Route("/api/v1/agents/<ref>/executions/batch", "POST"): {"items": [{"input": {}}]},
        Route("/api/v1/executions", "POST"): {"capability": "nlp", "input": {}},
        Route("/api/v1/agents/<ref>/wallet", "POST"): {"label": "echo's"},
        Route("/api/v1/chains", "POST"): {
            "name": "fresh-chain",
            "steps": [{"name": "one", "agent": world.agent["name"]}],
        },
        Route("/api/v1/chains/<ref>", "PATCH"): {"description": "changed"},
        Route("/api/v1/chains/<ref>/executions", "POST"): {"input": {}},
        Route("/api/v1/schedules", "POST"): {
            "name": "fresh",
            "target": target,
            "cron": "0 3 * * *",
        },
        Route("/api/v1/schedules/<ref>", "PATCH"): {"enabled": False},
        Route("/api/v1/triggers", "POST"): {"name": "fresh", "target": target, "input": {}},
        Route("/api/v1/executions/<execution_id>/rerun", "POST"): {},
        Route("/api/v1/executions/rerun", "POST"): {"dry_run": True},
        Route("/api/v1/chain-executions/<execution_id>/rerun", "POST"): {"from": "failed"},
        Route("/api/v1/notifications", "POST"): {
            "name": "fresh",
            "url": "http://127.0.0.2:9/",
            "events": ["execution.failed"],
        },
        Route("/api/v1/notifications/<notification_id>", "PATCH"): {"name": "changed"},
        Route("/api/v1/agents/<ref>/rollback", "POST"): {"version": "1.0.0"},
        Route("/api/v1/chains/<ref>/rollback", "POST"): {"version": "1.0.0"},
        Route("/api/v1/secrets/<name>", "PUT"): {"value": "a new value"},
        Route("/api/v1/tokens", "POST"): {"name": "fresh", "role": "viewer"},
        Route("/api/v1/catalog/<org>/<agent>/executions", "POST"): {"input": {}},
        Route("/api/v1/agents/<ref>/state/<key>", "PUT"): {"value": {"page": 2}},
        Route("/api/v1/events", "POST"): {"name": "order.paid", "data": {"n": 1}},
    }


def _schema_fields(spec: dict, schema: dict) -> set[str]:
    name = schema["$ref"].rsplit("/", 1)[1]
    return set(spec["components"]["schemas"][name].get("properties", {}))


def server_owned_fields(spec: dict, route: Route) -> set[str]:
    """What the route answers with but does not take, and the fields every object has."""
    operation = spec["paths"][spec_path(route)][route.method.lower()]
    taken = _schema_fields(spec, operation["requestBody"]["content"]["application/json"]["schema"])
    success = next(code for code in operation["responses"] if code.startswith("2"))
    answered = _schema_fields(
        spec, operation["responses"][success]["content"]["application/json"]["schema"]
    )
    return (answered | ALWAYS_SERVER_OWNED) - taken


def test_server_owned_fields_are_422_keyed_by_field(app, client, org, world):
    """The hook's body is the sender's event, not a Runyard object: it has no such fields."""
    spec = client.get("/api/v1/openapi.json").get_json()
    bodies = valid_bodies(world)
    finish_world(world)
    assert set(bodies) == set(body_routes(app)) - {HOOK}
    for route, body in bodies.items():
        path = fill(route, world.values_for(route))
        owned = server_owned_fields(spec, route)
        assert {"status", "created_at"} <= owned and ("id" in owned) != (route in TAKES_AN_ID)
        for field in sorted(owned):
            response = client.open(
                path, method=route.method, json={**body, field: "x"}, headers=org.headers
            )
            errors = assert_error_shape(response, 422)["errors"]
            assert f"/{field}" in errors, (route, field, errors)
        # The same body without the field is accepted: the field alone was refused.
        accepted = client.open(path, method=route.method, json=body, headers=org.headers)
        assert accepted.status_code < 300, (route, accepted.get_json())


def test_nul_characters_are_422_not_500(client, org, world):
    """PostgreSQL text and jsonb cannot hold U+0000 (found by the schemathesis run)."""
    query = client.get("/api/v1/agents?q=a%00b&tag=x", headers=org.headers)
    assert "q" in assert_error_shape(query, 422)["errors"]
    body = client.patch(
        "/api/v1/agents/echo", json={"output_schema": {"\u0000": 1}}, headers=org.headers
    )
    assert "/output_schema/\u0000" in assert_error_shape(body, 422)["errors"]
    escaped = client.patch(
        "/api/v1/agents/echo", json={"description": "a \\u0000 b"}, headers=org.headers
    )
    assert escaped.status_code == 200, escaped.get_json()


# What PostgreSQL text and jsonb cannot store, as JSON escapes: U+0000 and lone surrogates (a
# high without its low, a low alone). A valid pair (an emoji, escaped) is stored fine.
UNSTORABLE = {"nul": "\\u0000", "high": "\\ud800", "low": "\\udc00", "reversed": "\\udc00\\ud800"}
PATTERNED = {
    "name": "patterned",
    "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
    "input_schema": {"type": "object", "properties": {"t": {"type": "string", "pattern": "^a"}}},
}


def _raw_post(client, path, raw: str, headers) -> object:
    return client.post(path, data=raw.encode(), headers={**headers, **JSON})


@pytest.mark.parametrize("escape", UNSTORABLE.values(), ids=UNSTORABLE.keys())
def test_unstorable_text_in_a_body_is_422_by_pointer(client, org, world, escape):
    """Found by a review: a lone surrogate reached RE2 (UnicodeEncodeError) or jsonb: a 500."""
    assert client.post("/api/v1/agents", json=PATTERNED, headers=org.headers).status_code == 201
    for agent in ("echo", "patterned"):
        path = f"/api/v1/agents/{agent}/executions"
        value = _raw_post(client, path, f'{{"input": {{"t": "a{escape}"}}}}', org.headers)
        body = assert_error_shape(value, 422)
        assert list(body["errors"]) == ["/input/t"], body
        key = _raw_post(client, path, f'{{"input": {{"k{escape}": "a"}}}}', org.headers)
        assert len(assert_error_shape(key, 422)["errors"]) == 1
    described = _raw_post(
        client, "/api/v1/agents", f'{{"name": "x", "description": "{escape}"}}', org.headers
    )
    assert "/description" in assert_error_shape(described, 422)["errors"]


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_number_json_cannot_hold_is_422_by_pointer(client, org, world, number):
    """Found by a review: Python's parser takes NaN, Infinity and 1e999 (inf); jsonb does not:
    a 500 in any body (an input, a config). A string holding the same letters is fine."""
    path = "/api/v1/agents/echo/executions"
    refused = _raw_post(client, path, f'{{"input": {{"t": "a", "n": {number}}}}}', org.headers)
    assert list(assert_error_shape(refused, 422)["errors"]) == ["/input/n"]
    defined = _raw_post(
        client, "/api/v1/agents", f'{{"name": "x", "timeout_seconds": {number}}}', org.headers
    )
    assert "/timeout_seconds" in assert_error_shape(defined, 422)["errors"]
    fine = _raw_post(client, path, f'{{"input": {{"t": "{number} 1e308"}}}}', org.headers)
    assert fine.status_code == 202, fine.get_json()


@pytest.mark.parametrize(
    "text", ["a\\ud83d\\ude00", "a\\\\ud800", "a\\\\u0000", "a\U0001f600"], ids=str
)
def test_storable_text_that_looks_alike_is_accepted(client, org, world, text):
    """An escaped pair, an escaped backslash before `ud800`, a raw non-BMP character."""
    assert client.post("/api/v1/agents", json=PATTERNED, headers=org.headers).status_code == 201
    raw = f'{{"input": {{"t": "{text}"}}}}'
    for agent in ("echo", "patterned"):
        response = _raw_post(client, f"/api/v1/agents/{agent}/executions", raw, org.headers)
        assert response.status_code == 202, response.get_json()
        assert response.get_json()["input"] == {"t": json.loads(f'"{text}"')}


@pytest.mark.parametrize("escape", UNSTORABLE.values(), ids=UNSTORABLE.keys())
def test_unstorable_text_in_a_webhook_delivery_is_422_after_its_signature(
    client, org, world, escape
):
    """Deliveries create executions too; an unsigned one is still a 401 first."""
    trigger = client.post(
        "/api/v1/triggers",
        json={"name": "relay", "target": {"agent": "echo"}, "input": {"text": "$.event.text"}},
        headers=org.headers,
    )
    assert trigger.status_code == 201, trigger.get_json()
    created = trigger.get_json()
    for raw in (f'{{"text": "a{escape}"}}', f'{{"other": ["{escape}"]}}'):
        unsigned = client.post(created["url"], data=raw.encode(), headers=JSON)
        assert_error_shape(unsigned, 401)
        delivered = client.post(
            created["url"], data=raw.encode(), headers=signed(created["secret"], raw.encode())
        )
        errors = assert_error_shape(delivered, 422)["errors"]
        assert list(errors) in (["/text"], ["/other/0"]), errors


def test_a_webhook_body_not_in_utf8_is_400_not_500(client, org, world):
    """json.loads on bytes would take UTF-16/32 and raw (CESU) surrogates, past the escape check."""
    trigger = client.post(
        "/api/v1/triggers",
        json={"name": "relay-bytes", "target": {"agent": "echo"}, "input": {"text": "$.event.t"}},
        headers=org.headers,
    )
    created = trigger.get_json()
    for raw in (
        b'{"t": "a\xed\xa0\x80"}',
        '{"t": "a\\u0000"}'.encode("utf-16"),
        '{"t": "a\\ud800"}'.encode("utf-32"),
    ):
        delivered = client.post(created["url"], data=raw, headers=signed(created["secret"], raw))
        assert "UTF-8" in assert_error_shape(delivered, 400)["message"], raw


def test_unstorable_text_in_a_path_or_query_parameter_is_422_by_name(client, org, world):
    """A NUL in a path parameter reached PostgreSQL as an agent name: a 500."""
    for path in ("/api/v1/agents/a%00b", "/api/v1/agents/echo/versions/1%00"):
        errors = assert_error_shape(client.get(path, headers=org.headers), 422)["errors"]
        assert set(errors) & {"ref", "version"}, (path, errors)
    query = client.get("/api/v1/executions?agent=e%00", headers=org.headers)
    assert list(assert_error_shape(query, 422)["errors"]) == ["agent"]
    for name in ("q", "agent"):
        query = client.get(f"/api/v1/logs?{name}=e%00", headers=org.headers)
        assert list(assert_error_shape(query, 422)["errors"]) == [name]


# An agent's flow fields with what JSON can carry but no limit can be: numbers past any machine
# integer or float (JSON's 1e999 is infinity to Python), NaN, a NUL in the key, wrong shapes.
HOSTILE_FLOW = {
    "huge-limit": ('{"concurrency": {"limit": 1' + "0" * 400 + "}}", "/concurrency/limit"),
    "huge-rate": (
        '{"rate_limit": {"limit": 1' + "0" * 400 + ', "period_seconds": 1}}',
        "/rate_limit/limit",
    ),
    "infinite-period": (
        '{"rate_limit": {"limit": 1, "period_seconds": 1e999}}',
        "/rate_limit/period_seconds",
    ),
    "nan-period": (
        '{"rate_limit": {"limit": 1, "period_seconds": NaN}}',
        "/rate_limit/period_seconds",
    ),
    "tiny-period": (
        '{"rate_limit": {"limit": 1, "period_seconds": 1e-999}}',
        "/rate_limit/period_seconds",
    ),
    "nul-key": ('{"concurrency": {"limit": 1, "key": "$.input.a\\u0000"}}', "/concurrency/key"),
    "object-key": ('{"concurrency": {"limit": 1, "key": {"$.input": 1}}}', "/concurrency/key"),
    "list": ('{"rate_limit": [1, 60]}', "/rate_limit"),
}


@pytest.mark.parametrize(("raw", "pointer"), HOSTILE_FLOW.values(), ids=HOSTILE_FLOW.keys())
def test_hostile_flow_values_are_422_by_pointer(client, org, world, raw, pointer):
    for path, method in (("/api/v1/agents", "POST"), ("/api/v1/agents/echo", "PATCH")):
        body = raw
        if method == "POST":
            body = '{"name": "flowing", "runtime": {"type": "python", "entrypoint": ' + (
                '"tests.agents:echo"}, ' + raw[1:]
            )
        response = client.open(
            path, method=method, data=body.encode(), headers={**org.headers, **JSON}
        )
        errors = assert_error_shape(response, 422)["errors"]
        assert pointer in errors, (method, errors)
    assert client.get("/api/v1/agents/echo", headers=org.headers).get_json()["concurrency"] is None
