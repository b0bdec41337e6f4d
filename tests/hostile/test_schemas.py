"""Hostile JSON Schemas: catastrophic patterns stay linear, remote references are never fetched."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.hostile.conftest import assert_error_shape

RUNTIME = {"type": "python", "entrypoint": "tests.agents:echo"}
# Exponential on a backtracking engine: Python's `re` needs minutes for 30 "a"s and a "!".
CATASTROPHIC = "^(a+)+$"
EVIL_TEXT = "a" * 5000 + "!"
# Generous for a loaded 2-core machine; the backtracking engine would need far longer than the
# suite's timeout for this text.
BOUND_SECONDS = 2.0


def create_agent(client, org, name: str, **fields):
    return client.post(
        "/api/v1/agents", json={"name": name, "runtime": RUNTIME, **fields}, headers=org.headers
    )


def timed(call):
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


@pytest.mark.parametrize(
    ("schema", "payload", "pointer"),
    [
        (
            {"type": "object", "properties": {"text": {"type": "string", "pattern": CATASTROPHIC}}},
            {"text": EVIL_TEXT},
            "/input/text",
        ),
        (
            {"type": "object", "patternProperties": {CATASTROPHIC: {"type": "integer"}}},
            {"a" * 5000: "not an integer", EVIL_TEXT: 1},
            "/input",
        ),
        (
            {
                "type": "object",
                "patternProperties": {CATASTROPHIC: {}},
                "additionalProperties": False,
            },
            {EVIL_TEXT: 1},
            "/input",
        ),
        (
            {"type": "object", "propertyNames": {"pattern": CATASTROPHIC}},
            {EVIL_TEXT: 1},
            "/input",
        ),
    ],
    ids=["pattern", "patternProperties", "additionalProperties", "propertyNames"],
)
def test_catastrophic_pattern_is_checked_in_linear_time_on_submit(
    client, org, schema, payload, pointer
):
    """Accepted at creation (RE2 runs it in linear time); a hostile input is a quick 422."""
    assert create_agent(client, org, "regex", input_schema=schema).status_code == 201
    response, elapsed = timed(
        lambda: client.post(
            "/api/v1/agents/regex/executions", json={"input": payload}, headers=org.headers
        )
    )
    body = assert_error_shape(response, 422)
    assert any(key.startswith(pointer) for key in body["errors"]), body["errors"]
    assert elapsed < BOUND_SECONDS, elapsed
    fine = {"text": "aaaa"} if "properties" in schema else {}
    accepted = client.post(
        "/api/v1/agents/regex/executions", json={"input": fine}, headers=org.headers
    )
    assert accepted.status_code == 202, accepted.get_json()


def test_catastrophic_pattern_in_a_chain_input_and_a_schedule_input(client, org):
    schema = {"type": "object", "properties": {"text": {"type": "string", "pattern": CATASTROPHIC}}}
    assert create_agent(client, org, "regex", input_schema=schema).status_code == 201
    chain = client.post(
        "/api/v1/chains",
        json={"name": "c", "input_schema": schema, "steps": [{"name": "s", "agent": "regex"}]},
        headers=org.headers,
    )
    assert chain.status_code == 201, chain.get_json()
    response, elapsed = timed(
        lambda: client.post(
            "/api/v1/chains/c/executions", json={"input": {"text": EVIL_TEXT}}, headers=org.headers
        )
    )
    assert_error_shape(response, 422)
    assert elapsed < BOUND_SECONDS
    response, elapsed = timed(
        lambda: client.post(
            "/api/v1/schedules",
            json={
                "name": "s",
                "target": {"agent": "regex"},
                "cron": "0 2 * * *",
                "input": {"text": EVIL_TEXT},
            },
            headers=org.headers,
        )
    )
    assert_error_shape(response, 422)
    assert elapsed < BOUND_SECONDS


@pytest.mark.parametrize(
    ("schema", "pointer"),
    [
        ({"type": "string", "pattern": "^(a)\\1$"}, "/input_schema/pattern"),
        ({"type": "string", "pattern": "^(?=a)a$"}, "/input_schema/pattern"),
        ({"type": "string", "pattern": "(?<!a)b"}, "/input_schema/pattern"),
        ({"type": "string", "pattern": "a{2000}"}, "/input_schema/pattern"),
        ({"type": "string", "pattern": "("}, "/input_schema/pattern"),
        (
            {"type": "object", "properties": {"x": {"patternProperties": {"(?!b)": {}}}}},
            "/input_schema/properties/x/patternProperties",
        ),
        (
            {"type": "object", "patternProperties": {"^a": {}}, "unevaluatedProperties": False},
            "/input_schema",
        ),
        (
            {
                "allOf": [{"$ref": "#/$defs/keyed"}],
                "$defs": {"keyed": {"patternProperties": {"^a": {}}}},
                "unevaluatedProperties": False,
            },
            "/input_schema",
        ),
        (
            {
                "$ref": "#/x-keyed",
                "x-keyed": {"patternProperties": {"^a": {}}, "unevaluatedProperties": False},
            },
            "/input_schema",
        ),
        (
            {"$ref": "#/x-text", "x-text": {"properties": {"t": {"pattern": "(a)\\1"}}}},
            "/input_schema/x-text/properties/t/pattern",
        ),
    ],
    ids=[
        "backreference",
        "lookahead",
        "lookbehind",
        "repetition",
        "unbalanced",
        "nested",
        "uneval",
        "uneval-across-subschemas",
        "uneval-in-a-ref-target-outside-the-keywords",
        "pattern-in-a-ref-target-outside-the-keywords",
    ],
)
def test_patterns_re2_cannot_run_are_422_at_creation(client, org, schema, pointer):
    body = assert_error_shape(create_agent(client, org, "refused", input_schema=schema), 422)
    assert pointer in body["errors"], body["errors"]
    assert client.get("/api/v1/agents/refused", headers=org.headers).status_code == 404


def test_pattern_like_values_that_are_not_patterns_are_left_alone(client, org):
    """A property named `pattern`, or a `const` holding one, is data, not a regular expression."""
    schema = {
        "type": "object",
        "properties": {"pattern": {"const": {"pattern": "(unbalanced"}}},
        "examples": [{"pattern": "(a)\\1"}],
    }
    assert create_agent(client, org, "data", input_schema=schema).status_code == 201


@pytest.mark.parametrize(
    ("schema", "refused", "accepted"),
    [
        (
            {
                "type": "object",
                "properties": {"patternProperties": {"type": "string"}},
                "unevaluatedProperties": False,
            },
            {"other": 1},
            {"patternProperties": "x"},
        ),
        (
            {
                "type": "object",
                "patternProperties": {"^a": {"type": "integer"}},
                "properties": {"unevaluatedProperties": {"type": "boolean"}},
            },
            {"a1": "x"},
            {"a1": 1, "unevaluatedProperties": True},
        ),
        (
            {
                "type": "object",
                "patternProperties": {"^a": {"type": "integer"}},
                "properties": {"x": {"const": {"unevaluatedProperties": False}}},
                "examples": [{"unevaluatedProperties": 1}],
            },
            {"x": 1},
            {"a1": 1, "x": {"unevaluatedProperties": False}},
        ),
    ],
    ids=["a-property-named-patternProperties", "a-property-named-uneval", "in-values"],
)
def test_keyword_names_as_property_names_or_values_are_not_keywords(
    client, org, schema, refused, accepted
):
    """Found by a review: any key named `patternProperties` counted, a property's name too."""
    response = create_agent(client, org, "named", input_schema=schema)
    assert response.status_code == 201, response.get_json()
    submit = "/api/v1/agents/named/executions"
    assert_error_shape(client.post(submit, json={"input": refused}, headers=org.headers), 422)
    ok = client.post(submit, json={"input": accepted}, headers=org.headers)
    assert ok.status_code == 202, ok.get_json()


def test_a_percent_encoded_reference_resolves_as_validation_does(client, org):
    """`a%2Fb` is decoded before the pointer is read (two steps), as `referencing` does."""
    schema = {
        "type": "object",
        "properties": {"v": {"$ref": "#/$defs/a%2Fb"}},
        "$defs": {"a": {"b": {"type": "string", "pattern": "^x+$"}}},
    }
    assert create_agent(client, org, "pct-ref", input_schema=schema).status_code == 201
    bad = client.post(
        "/api/v1/agents/pct-ref/executions", json={"input": {"v": "y"}}, headers=org.headers
    )
    assert bad.status_code == 422 and "/input/v" in bad.get_json()["errors"]


def test_an_id_below_the_root_is_422(client, org):
    """An inner $id changes what `#/x` means below it: the pattern checks could not follow it."""
    schema = {
        "type": "object",
        "properties": {"p": {"$id": "urn:inner", "x": {"pattern": "(?=a)"}, "$ref": "#/x"}},
        "x": {},
    }
    response = create_agent(client, org, "inner-id", input_schema=schema)
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["errors"] == {
        "/input_schema": ["$id is allowed on the root schema only"]
    }
    assert create_agent(client, org, "root-id", input_schema={"$id": "urn:root"}).status_code == 201


def test_ecma_unicode_escapes_match(client, org):
    schema = {
        "type": "object",
        "properties": {"t": {"type": "string", "pattern": "^\\u00e9t\\u00e9$"}},
    }
    assert create_agent(client, org, "summer", input_schema=schema).status_code == 201
    submit = "/api/v1/agents/summer/executions"
    assert client.post(submit, json={"input": {"t": "été"}}, headers=org.headers).status_code == 202
    refused = client.post(submit, json={"input": {"t": "ete"}}, headers=org.headers)
    assert_error_shape(refused, 422)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket no request may connect to."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        yield server


def remote_ref_schemas(port: int) -> list[tuple[dict, str]]:
    local = f"http://127.0.0.1:{port}"
    return [
        ({"$ref": "https://example.com/schemas/ticket.json"}, ""),
        ({"$ref": f"{local}/schema.json"}, ""),
        ({"$ref": "file:///etc/passwd"}, ""),
        ({"type": "object", "properties": {"a": {"$ref": f"{local}/a.json#/x"}}}, "/properties/a"),
        ({"$id": f"{local}/root.json", "$ref": "sibling.json"}, ""),
        ({"$dynamicRef": f"{local}/dyn.json#meta"}, ""),
        ({"allOf": [{"$ref": "//127.0.0.1:" + str(port) + "/x"}]}, "/allOf/0"),
    ]


def test_remote_refs_are_422_and_never_fetched(client, org, listener):
    port = listener.getsockname()[1]
    assert create_agent(client, org, "base").status_code == 201
    for schema, where in remote_ref_schemas(port):
        keyword = "$dynamicRef" if "$dynamicRef" in str(schema) else "$ref"
        for field in ("input_schema", "output_schema"):
            created = create_agent(client, org, "remote", **{field: schema})
            errors = assert_error_shape(created, 422)["errors"]
            assert f"/{field}{where}/{keyword}" in errors, (schema, errors)
            patched = client.patch("/api/v1/agents/base", json={field: schema}, headers=org.headers)
            assert_error_shape(patched, 422)
        chain = client.post(
            "/api/v1/chains",
            json={
                "name": "remote",
                "input_schema": schema,
                "steps": [{"name": "s", "agent": "base"}],
            },
            headers=org.headers,
        )
        assert_error_shape(chain, 422)
    assert client.get("/api/v1/agents/remote", headers=org.headers).status_code == 404
    assert client.get("/api/v1/agents/base", headers=org.headers).get_json()["current_version"] == (
        "1.0.0"
    )
    with pytest.raises(BlockingIOError):
        listener.accept()
