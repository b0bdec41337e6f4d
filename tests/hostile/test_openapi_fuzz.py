"""schemathesis against our own OpenAPI document, in-process (the WSGI app, no network).

Every operation gets generated requests with a real admin token of a committed organization;
every answer must be no 5xx, a status code the operation documents, a JSON body of the documented
schema and content type. Path parameters name this organization's real objects for part of the
examples, so the fuzzing reaches past the 404s.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.hostile.conftest import Route, World

# Bounded and deterministic: the same examples on every run (20 per operation: over 95
# operations, about 1,900 cases and 40 seconds of a suite that must stay under 20 minutes).
MAX_EXAMPLES = 20
# Answers every operation may give without listing them one by one: the token (the spec's
# description says every route takes one) and what the edge says about a body.
GENERIC_STATUSES = {401, 403}
BODY_STATUSES = {400, 413, 415}


def documented_status(ctx, response, case) -> None:
    """Stricter than status_code_conformance: `default` (every operation has it) is not enough.
    A 5xx is never documented, so this is also the no-server-error check."""
    documented = {
        int(code) for code in case.operation.definition.raw["responses"] if code.isdigit()
    }
    allowed = documented | GENERIC_STATUSES
    if case.operation.body:
        allowed |= BODY_STATUSES
    if response.status_code not in allowed:
        raise AssertionError(
            f"{case.operation.label} answered {response.status_code}, not among {sorted(allowed)}"
            f": {response.text[:300]}"
        )


def error_has_hint(ctx, response, case) -> None:
    if response.status_code >= 400:
        body = response.json()
        assert body.get("hint"), f"{case.operation.label} {response.status_code}: {body}"


CHECKS = [
    not_a_server_error,
    documented_status,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    error_has_hint,
]


def strategy_for(
    operation,
    world: World,
    modes=(GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
    by: str = "name",
):
    """Requests of the given modes (valid and invalid by default), half of them naming a real
    object of the organization (by name, or by id where a route takes either)."""
    rule = operation.path.replace("{", "<").replace("}", ">")
    names = [parameter.name for parameter in operation.path_parameters]
    route = Route(rule, operation.method.upper())
    real = {name: world.values_for(route, by=by)[name] for name in names}
    strategies = []
    for mode in modes:
        strategies.append(operation.as_strategy(mode))
        if real:
            strategies.append(operation.as_strategy(mode, path_parameters=real))
    return st.one_of(strategies)


def bounded(max_examples: int):
    """A derandomized Hypothesis run of at most `max_examples` cases, no shrinking, no
    example database."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


def fuzz(operation, world: World, headers: dict[str, str], ran: dict[str, int]) -> None:
    """One bounded, derandomized Hypothesis run of one operation."""

    @bounded(MAX_EXAMPLES)
    @given(case=strategy_for(operation, world))
    def run(case):
        ran[operation.label] = ran.get(operation.label, 0) + 1
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()


def end_the_executions(client, world: World, headers: dict[str, str]) -> None:
    for path in (
        f"/api/v1/executions/{world.execution['id']}",
        f"/api/v1/chain-executions/{world.chain_execution['id']}",
    ):
        client.post(f"{path}/cancel", headers=headers)  # 202, or 409 if it had ended
        status = client.get(path, headers=headers).get_json()["status"]
        assert status not in ("queued", "running", "compensating"), (path, status)


# 4,900 cases over 49 operations once took about 130 s on a loaded 2-core machine, past the
# suite's 120 s default; the API has grown since.
@pytest.mark.timeout(300)
def test_every_operation_answers_as_documented(app, live_org, live_world):
    """The app's own spec, with the organization's admin token."""
    loaded = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    operations = [result.ok() for result in loaded.get_all_operations()]
    assert len(operations) >= 39
    # An event stream stays open while its execution runs: the streams are fuzzed last, once
    # the world's executions have ended (cancelled), so each answer ends with `end`.
    operations.sort(key=lambda operation: operation.path.endswith("/events"))
    streams_from = next(i for i, op in enumerate(operations) if op.path.endswith("/events"))
    ran: dict[str, int] = {}
    failures = []
    for index, operation in enumerate(operations):
        if index == streams_from:
            end_the_executions(app.test_client(), live_world, live_org.headers)
        try:
            fuzz(operation, live_world, live_org.headers, ran)
        # Every operation runs; all failures are reported together (Hypothesis raises groups).
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert set(ran) == {operation.label for operation in operations}
    print(f"schemathesis: {sum(ran.values())} cases over {len(ran)} operations")
