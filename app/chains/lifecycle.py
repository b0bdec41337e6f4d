"""A chain's versions over time (rollback, diff), and what an agent's new version would break
among what depends on it: the chains that run it unpinned and the inputs it recently accepted."""

from __future__ import annotations

from typing import Any

from sqlalchemy import String, select
from sqlalchemy.orm import Session

from app import jsonschemas, versiondiff
from app.agents import services as agents
from app.agents.models import Agent
from app.audit import services as audit
from app.chains import definitions, services
from app.chains.models import Chain, ChainVersion
from app.errors import Conflict, ValidationFailed
from app.executions.models import Execution
from app.orgs.services import Principal
from app.versioning import find_version, make_current

# How many of an agent's latest succeeded executions a new input schema must still accept.
RECENT_INPUTS = 100
FORCE_HINT = (
    'send "force": true with the PATCH to make the version anyway, or change the definition so '
    "the chains and inputs named in errors still check"
)

# ---------------------------------------------------------------------------------------------
# Chain versions


def rollback(session: Session, principal: Principal, ref: str, version: str) -> Chain:
    """Make an existing chain version current again; no version is made. Nothing cached needs
    forgetting: plans are cached by chain version id, and a submit reads the current one."""
    principal.require("agents:write")
    chain = services.resolve(session, principal, ref)
    if chain.archived_at is not None:
        raise Conflict(f"chain {chain.name!r} is archived", hint="archived chains cannot change")
    row = find_version(session, ChainVersion.chain_id, chain, version, "chain")
    before = services.audited_state(session, chain)
    make_current(chain, row)
    session.flush()
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change(
            "chain.rollback",
            "chain",
            chain.id,
            chain.name,
            audit.changes_between(before, services.audited_state(session, chain)),
        ),
    )
    return chain


def diff(
    session: Session, principal: Principal, ref: str, version: str, against: str | None
) -> dict[str, Any]:
    """From chain version `against` (default: the current one) to `version`."""
    chain = services.resolve(session, principal, ref)
    new = find_version(session, ChainVersion.chain_id, chain, version, "chain")
    old = find_version(
        session, ChainVersion.chain_id, chain, against or chain.current_version, "chain"
    )
    before, after = _chain_definition(old), _chain_definition(new)
    return {
        "from": old.version,
        "to": new.version,
        "changes": versiondiff.changes(before, after),
        "breaking": versiondiff.chain_breaks(before, after),
    }


def _chain_definition(row: ChainVersion) -> dict[str, Any]:
    return {field: getattr(row, field) for field in services.VERSIONED_FIELDS}


# ---------------------------------------------------------------------------------------------
# An agent's PATCH against what depends on the agent


def update_agent(session: Session, principal: Principal, ref: str, data: dict[str, Any]) -> Agent:
    """PATCH an agent (app/agents/services.py), refusing (409) a new version that would break
    a chain running the agent unpinned or refuse an input one of its latest succeeded
    executions had, unless `force`. Nothing is committed here: on a 409 the caller's
    transaction, new version included, is rolled back."""
    data = dict(data)
    force, changelog = data.pop("force", False), data.pop("changelog", None)
    principal.require("agents:write")
    agent = agents.resolve(session, principal, ref)
    schemas_change = "input_schema" in data or "output_schema" in data
    dependents = [] if force or not schemas_change else _unpinned_chains(session, agent)
    # Where a chain failed its checks already (another agent archived since, ...) is not this
    # PATCH's doing: compared by pointer, as the messages name the agent's version.
    before = {chain.name: _chain_problems(session, principal, chain) for chain in dependents}
    old_version_id = agent.current_version_id
    old_input = agents.current_version(session, agent).input_schema
    agents.update(session, principal, ref, data, changelog=changelog)
    if force or agent.current_version_id == old_version_id:
        return agent
    errors: dict[str, list[str]] = {}
    for chain in dependents:
        problems = _chain_problems(session, principal, chain)
        new = [
            f"{where}: {message}"
            for where, messages in problems.items()
            if where not in before[chain.name]
            for message in messages
        ]
        if new:
            errors[f"chain:{chain.name}"] = sorted(new)
    new_input = agents.current_version(session, agent).input_schema
    if new_input != old_input:
        errors.update(_refused_recent_inputs(session, agent, new_input))
    if errors:
        named = sorted(errors)
        more = f" and {len(named) - 3} more" if len(named) > 3 else ""
        raise Conflict(
            f"the new version of agent {agent.name!r} would break {', '.join(named[:3])}{more}",
            errors=errors,
            hint=FORCE_HINT,
        )
    return agent


def _unpinned_chains(session: Session, agent: Agent) -> list[Chain]:
    """The organization's live chains whose current version runs the agent (as a step or a
    compensation) without naming a version."""
    rows = session.execute(
        select(Chain, ChainVersion)
        .join(ChainVersion, ChainVersion.id == Chain.current_version_id)
        .where(
            Chain.org_id == agent.org_id,
            Chain.archived_at.is_(None),
            # A cheap first cut (names are [a-z0-9_-]); the plan below decides.
            ChainVersion.steps.cast(String).contains(f'"{agent.name}"'),
        )
        .order_by(Chain.name)
    ).all()
    return [
        chain
        for chain, version in rows
        if any(
            (step.agent == agent.name and step.version is None)
            or (
                step.compensate is not None
                and step.compensate["agent"] == agent.name
                and step.compensate.get("version") is None
            )
            for step in definitions.plan_for(version.steps, version.on_failure).steps
        )
    ]


def _chain_problems(session: Session, principal: Principal, chain: Chain) -> dict[str, list[str]]:
    """What the chain's creation checks say of its current version now, by pointer."""
    version = services.current_version(session, chain)
    document = {"name": chain.name, **_chain_definition(version)}
    try:
        services.check_definition(session, principal, document)
    except ValidationFailed as exc:
        return exc.errors
    return {}


def _refused_recent_inputs(
    session: Session, agent: Agent, input_schema: dict[str, Any]
) -> dict[str, list[str]]:
    validator = jsonschemas.validator_for(input_schema)
    recent = session.execute(
        select(Execution.id, Execution.input)
        .where(
            Execution.org_id == agent.org_id,
            Execution.agent_id == agent.id,
            Execution.status == "succeeded",
        )
        .order_by(Execution.queued_at.desc())
        .limit(RECENT_INPUTS)
    ).all()
    errors: dict[str, list[str]] = {}
    for execution_id, payload in recent:
        refused = jsonschemas.instance_errors(validator, payload, "/input")
        if refused:
            errors[f"execution:{execution_id}"] = [
                f"{pointer}: {message}"
                for pointer, messages in sorted(refused.items())
                for message in messages
            ]
    return errors
