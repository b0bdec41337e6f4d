"""The OpenAPI document can be trusted by generated clients and validators.

Every operation has a unique operationId, and what the document allows the server accepts:
schemathesis' positive_data_acceptance check, in-process, over every operation that takes a
body or parameters.
"""

from __future__ import annotations

import re
import uuid

import pytest
import schemathesis
from hypothesis import given
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.hostile.conftest import World
from tests.hostile.test_openapi_fuzz import bounded, end_the_executions, strategy_for

METHODS = ("get", "put", "post", "patch", "delete")
# The server-accepts check, per operation (about 20 seconds of the suite).
MAX_EXAMPLES = 15
IDEMPOTENCY_KEY = "Idempotency-Key"

# What the server refuses for reasons a JSON Schema cannot state: per operation, the JSON
# pointer (or parameter name) of each error of the 422 and its message, as regular expressions.
# Each rule is said in the document's descriptions. A 422 with any other error fails.
AGENT_DEFINITION = [
    # Settings of the installation, not of the document: RUNYARD_AGENT_MODULES,
    # RUNYARD_ALLOWED_COMMANDS, RUNYARD_MAX_TIMEOUT_SECONDS.
    (r"/runtime/entrypoint", r"module must lie under"),
    (r"/runtime/argv/0", r"RUNYARD_ALLOWED_COMMANDS"),
    (r"/timeout_seconds", r"^at most \d+$"),
    # A script must compile: Python's grammar is no schema.
    (r"/runtime/source", r""),
    # OpenAPI 3.0 has no propertyNames: environment and header names (their patterns are in
    # the descriptions, and reported on the object), and the headers the http runtime sets.
    (r"/runtime/(env|headers)", r"does not match"),
    (r"/runtime/headers/.+", r"set by the http runtime itself"),
    # A URL's host and port, parsed.
    (r"/runtime/url", r"not a usable URL|needs a host name"),
    # Across two forms: a capability's name given as a string and as an object's `name`.
    (r"/capabilities/\d+", r"is named twice"),
    # A wallet_policy's amounts: above 0 (the pattern allows "0"), and in order.
    (r"/wallet_policy/(max_per_transaction|max_per_day|approval_over)", r"above 0|at most max_"),
    # Across two fields: the http call's timeout may not exceed the agent's.
    (r"/runtime/timeout_seconds", r"at most the agent's"),
    # input_schema and output_schema must be valid JSON Schemas (against the metaschema).
    (r"/(input|output)_schema(/.*)?", r""),
]
# What other objects of the organization hold: a new version above the existing ones, the
# names an object refers to, the input schema of the agent (or chain) an input goes to.
NEW_VERSION = (r"/version", r"must be greater than every existing version|only given with a change")
# A changelog describes a new version: a PATCH that makes none has nothing to describe.
CHANGELOG = (r"/changelog", r"only given with a change")
INPUT = (r"/input(/.*)?", r"")
# The ids of documents a submit hands its execution must be the organization's.
DOCUMENTS = (r"(/items/\d+)?/documents/\d+", r"^no document .* in your organization$")
TARGET = (r"/target/(agent|chain)", r"no such (agent|chain) in your organization")
# A chain's creation checks its steps against each other and against the agents they name
# (references, unique names, agents and versions that exist, compatible schemas); every such
# message names the step.
CHAIN_DEFINITION = [
    (r"/steps/.*", r"^(the )?(compensation of )?step (name )?'"),
    (r"/(input|output)_schema(/.*)?", r""),
]
SCHEDULE = [
    # A cron expression's fields and an IANA timezone name (the tz database's list).
    (r"/cron", r""),
    (r"/timezone", r"not an IANA timezone name"),
    TARGET,
    INPUT,
]
NOTIFICATION = [
    (r"/filter/agents/\d+", r"in your organization"),
    # The address guard: an IP literal that is not public, unless RUNYARD_HTTP_ALLOW_HOSTS
    # lists it (a setting).
    (r"/url", r"RUNYARD_HTTP_ALLOW_HOSTS"),
]
NOT_IN_A_SCHEMA: dict[str, list[tuple[str, str]]] = {
    "POST /api/v1/agents": AGENT_DEFINITION,
    "PATCH /api/v1/agents/{ref}": [*AGENT_DEFINITION, NEW_VERSION, CHANGELOG],
    "POST /api/v1/agents/{ref}/executions": [INPUT, DOCUMENTS],
    "POST /api/v1/agents/{ref}/executions/batch": [(r"/items/\d+/input(/.*)?", r""), DOCUMENTS],
    "POST /api/v1/catalog/{org}/{agent}/executions": [INPUT, DOCUMENTS],
    "POST /api/v1/executions/{execution_id}/rerun": [INPUT],
    "POST /api/v1/chains": CHAIN_DEFINITION,
    "PATCH /api/v1/chains/{ref}": [*CHAIN_DEFINITION, NEW_VERSION, CHANGELOG],
    "POST /api/v1/chains/{ref}/executions": [INPUT],
    # OpenAPI 3.0 has no propertyNames: the filter's dotted paths (said in its description).
    "POST /api/v1/triggers": [TARGET, (r"/on_event/filter/.*", r"not a dotted path")],
    "POST /api/v1/notifications": NOTIFICATION,
    "PATCH /api/v1/notifications/{notification_id}": NOTIFICATION,
    # Across two parameters: a text search spans at most 7 days.
    "GET /api/v1/logs": [(r"since", r"at most 7 days")],
    # Across two fields: finished_after later than finished_before matches nothing.
    "POST /api/v1/executions/rerun": [(r"/filter/finished_after", r"later than finished_before")],
    # The steps of the chain execution's own version.
    "POST /api/v1/chain-executions/{execution_id}/rerun": [
        (r"/from", r"has no step named|no step failed")
    ],
    "POST /api/v1/schedules": SCHEDULE,
    "PATCH /api/v1/schedules/{ref}": SCHEDULE,
}


def beyond_the_schema(label: str, response) -> bool:
    """A 422 only for rules no schema can state (NOT_IN_A_SCHEMA)."""
    if response.status_code != 422:
        return False
    rules = NOT_IN_A_SCHEMA.get(label, [])
    errors = response.json().get("errors") or {}
    return bool(errors) and all(
        any(
            re.fullmatch(pointer, key) and all(re.search(message, m) for m in messages)
            for pointer, message in rules
        )
        for key, messages in errors.items()
    )


def failed_precondition(case, response) -> bool:
    """A 412 to a request sent with If-Match: whether it holds depends on the version stored
    (an agent's state entry), which no schema can state."""
    return response.status_code == 412 and "If-Match" in (case.headers or {})


def accepted(ctx, response, case) -> None:
    if not (
        beyond_the_schema(case.operation.label, response) or failed_precondition(case, response)
    ):
        positive_data_acceptance(ctx, response, case)


def operations_of(spec: dict) -> list[tuple[str, str, dict]]:
    return [
        (method, path, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


# The names clients are generated with: renaming one breaks them.
CONTRACT_IDS = {
    "createAgent": ("post", "/api/v1/agents"),
    "getAgent": ("get", "/api/v1/agents/{ref}"),
    "updateAgent": ("patch", "/api/v1/agents/{ref}"),
    "archiveAgent": ("delete", "/api/v1/agents/{ref}"),
    "listAgentVersions": ("get", "/api/v1/agents/{ref}/versions"),
    "submitExecution": ("post", "/api/v1/agents/{ref}/executions"),
    "submitExecutionBatch": ("post", "/api/v1/agents/{ref}/executions/batch"),
    "getExecution": ("get", "/api/v1/executions/{execution_id}"),
    "listExecutions": ("get", "/api/v1/executions"),
    "cancelExecution": ("post", "/api/v1/executions/{execution_id}/cancel"),
}


def test_every_operation_has_a_unique_camel_case_operation_id(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    ids = {}
    for method, path, operation in operations_of(spec):
        operation_id = operation.get("operationId")
        assert operation_id, f"{method.upper()} {path} has no operationId"
        assert re.fullmatch(r"[a-z]+([A-Z][a-z]*)+", operation_id), operation_id
        assert operation_id not in ids, (operation_id, ids.get(operation_id), (method, path))
        ids[operation_id] = (method, path)
    assert {name: ids.get(name) for name in CONTRACT_IDS} == CONTRACT_IDS


def accept(operation, world: World, headers: dict[str, str], ran: dict[str, int]) -> None:
    # Valid requests only; by id, as a PATCH may rename the object.
    @bounded(MAX_EXAMPLES)
    @given(case=strategy_for(operation, world, (GenerationMode.POSITIVE,), by="id"))
    def run(case):
        ran[operation.label] = ran.get(operation.label, 0) + 1
        # One key per request: the same key again with another body is a 422 by design, a
        # rule over two requests that no schema of one request can state.
        if case.headers and IDEMPOTENCY_KEY in case.headers:
            case.headers[IDEMPOTENCY_KEY] = case.headers[IDEMPOTENCY_KEY][:200] + uuid.uuid4().hex
        case.call_and_validate(headers=headers, checks=[accepted])

    run()


def takes_data(operation) -> bool:
    return bool(operation.body) or any(True for _ in operation.iter_parameters())


@pytest.mark.timeout(300)
def test_what_the_document_allows_the_server_accepts(app, live_org, live_world):
    loaded = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    # U+0000 is refused in every string (app/storable.py: PostgreSQL cannot store it), which
    # JSON Schema could only say with a pattern on every string of the document.
    loaded.config.generation.update(allow_x00=False)
    operations = [result.ok() for result in loaded.get_all_operations()]
    operations = [operation for operation in operations if takes_data(operation)]
    # Archiving and deleting last (the world's objects stay for the others), the streams after
    # them, once the world's executions have ended.
    operations.sort(
        key=lambda operation: (operation.path.endswith("/events"), operation.method == "delete")
    )
    streams_from = next(i for i, op in enumerate(operations) if op.path.endswith("/events"))
    ran: dict[str, int] = {}
    failures = []
    for index, operation in enumerate(operations):
        if index == streams_from:
            end_the_executions(app.test_client(), live_world, live_org.headers)
        try:
            accept(operation, live_world, live_org.headers, ran)
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert set(ran) == {operation.label for operation in operations}
    print(f"positive data: {sum(ran.values())} cases over {len(ran)} operations")


def test_patterns_from_the_definitions_mean_what_the_server_matches():
    """`\\s` is spelled out as Python's (the server's), so an ECMA-262 client matches alike."""
    from app.openapi import _document, rule

    original = _document("agent")["$defs"]["http_runtime"]["properties"]["url"]["pattern"]
    [http] = [
        runtime
        for runtime in rule("agent", "runtime")["oneOf"]
        if runtime["properties"]["type"]["enum"] == ["http"]
    ]
    converted = http["properties"]["url"]["pattern"]
    assert "\\s" not in converted and "\\S" not in converted
    for code in [*range(0x3001), 0xFEFF]:
        for url in (f"https://a{chr(code)}b/", f"https://a/b{chr(code)}c"):
            assert bool(re.match(original, url)) == bool(re.match(converted, url)), hex(code)
