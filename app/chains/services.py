"""Chains: definitions and versions, and reading chain executions.

A chain execution runs as a Celery canvas of `runyard.chain_step` tasks built from its plan
(app/chains/launch.py): sequential steps as a chain, a `parallel` group as a group, the step
after it as the chord body. PostgreSQL, not the canvas, knows where a chain stands:

- A step's execution row is created when the step starts (app/chains/steps.py), with its input
  read from the chain's state in PostgreSQL. Its id is derived from (chain execution, stage,
  step), so a duplicate message finds the row taken and does nothing. Rows of steps that may not
  run yet do not exist, so the executions sweeper never sees them.
- A step starts only once every step of the stage before it has finished; under
  on_failure=stop, only once they all succeeded (otherwise it stops the chain instead).
- Whoever records a step's last outcome moves the chain on (app/chains/progress.py): inside the
  canvas the next task is already on its way; outside it (a retry ran as a plain execution, a
  message was lost) the rest of the canvas is published again from the first stage that has
  not run (`reconcile`). A duplicate step message is harmless, a missing one is found by
  `resume_stalled` (beat) and published again.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import jsonschemas
from app.agents.models import Agent, AgentVersion
from app.audit import services as audit
from app.chains import definitions, typecheck
from app.chains.definitions import AgentSchemas, Plan, Problems
from app.chains.models import Chain, ChainExecution, ChainVersion
from app.chains.plans import plans
from app.config import current_config
from app.db import page, utcnow
from app.errors import Conflict, NotFound, ValidationFailed
from app.executions.models import Execution
from app.orgs.services import Principal
from app.versioning import FIRST_VERSION, add_version, next_version, refuse_changelog

VERSIONED_FIELDS = ("input_schema", "steps", "on_failure")

# ---------------------------------------------------------------------------------------------
# Definitions and versions


def resolve(session: Session, principal: Principal, ref: str) -> Chain:
    query = select(Chain).where(Chain.org_id == principal.org_id)
    try:
        query = query.where(Chain.id == uuid.UUID(ref))
    except ValueError:
        query = query.where(Chain.name == ref)
    chain = session.scalar(query)
    if chain is None:
        raise NotFound(f"no chain {ref!r}", hint="GET /api/v1/chains lists your chains")
    return chain


def current_version(session: Session, chain: Chain) -> ChainVersion:
    version = session.get(ChainVersion, chain.current_version_id)
    assert version is not None, "every chain has a current version"
    return version


def agent_version(
    session: Session, org_id: uuid.UUID, name: str, version: str | None
) -> tuple[AgentVersion | None, str | None]:
    """The agent version a step runs (its pinned one, else the current), or why there is none."""
    agent = session.scalar(select(Agent).where(Agent.org_id == org_id, Agent.name == name))
    if agent is None:
        return None, f"no agent named {name!r}"
    if agent.archived_at is not None:
        return None, f"agent {name!r} is archived"
    if version is None:
        return session.get(AgentVersion, agent.current_version_id), None
    row = session.scalar(
        select(AgentVersion).where(
            AgentVersion.agent_id == agent.id, AgentVersion.version == version
        )
    )
    if row is None:
        return None, f"agent {name!r} has no version {version!r}"
    return row, None


@dataclass(frozen=True)
class Resolved:
    plan: Plan
    step_versions: list[AgentVersion]
    compensate_versions: list[AgentVersion | None]


def check_definition(session: Session, principal: Principal, document: dict[str, Any]) -> Resolved:
    """Everything that can be checked before anything runs; one 422 listing every problem."""
    cfg = current_config()
    jsonschemas.validate_definition(document, "chain")
    jsonschemas.check_user_schema(
        document["input_schema"],
        "input_schema",
        max_bytes=cfg.schema_max_bytes,
        max_depth=cfg.schema_max_depth,
    )
    plan = definitions.plan_for(document["steps"], document["on_failure"])
    problems = Problems()
    definitions.check_structure(plan, document, problems)
    agents: dict[int, AgentSchemas] = {}
    compensators: dict[int, AgentSchemas] = {}
    step_versions: list[AgentVersion | None] = []
    compensate_versions: list[AgentVersion | None] = []
    for step in plan.steps:
        row, why = agent_version(session, principal.org_id, step.agent, step.version)
        if row is None:
            field = "/version" if step.version and why and "no version" in why else "/agent"
            problems.add(step.pointer + field, f"step {step.name!r}: {why}")
        else:
            agents[step.index] = AgentSchemas(
                step.agent, row.version, row.input_schema, row.output_schema
            )
        step_versions.append(row)
        compensator = None
        if step.compensate is not None:
            wanted = step.compensate.get("version")
            compensator, why = agent_version(
                session, principal.org_id, step.compensate["agent"], wanted
            )
            if compensator is None:
                field = "/version" if wanted and why and "no version" in why else "/agent"
                problems.add(
                    step.pointer + "/compensate" + field,
                    f"compensation of step {step.name!r}: {why}",
                )
            else:
                compensators[step.index] = AgentSchemas(
                    step.compensate["agent"],
                    compensator.version,
                    compensator.input_schema,
                    compensator.output_schema,
                )
        compensate_versions.append(compensator)
    if not problems.messages:
        typecheck.check_types(plan, document["input_schema"], agents, compensators, problems)
    problems.raise_if_any()
    return Resolved(plan, step_versions, compensate_versions)  # type: ignore[arg-type]


def _add_version(
    session: Session,
    principal: Principal,
    chain: Chain,
    definition: dict[str, Any],
    version: str,
    changelog: str | None = None,
) -> ChainVersion:
    return add_version(
        session,
        ChainVersion.chain_id,
        chain,
        definition,
        version,
        changelog,
        audit.created_by(principal),
    )


def audited_state(session: Session, chain: Chain) -> dict[str, Any]:
    """What a chain's update and rollback events compare."""
    return audit.snapshot(describe(session, chain))


def _definition(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "input_schema": data.get("input_schema", {"type": "object"}),
        "steps": data["steps"],
        "on_failure": data.get("on_failure", "stop"),
    }


def create(session: Session, principal: Principal, data: dict[str, Any]) -> Chain:
    principal.require("agents:write")
    definition = _definition(data)
    check_definition(session, principal, {**data, **definition})
    chain = Chain(org_id=principal.org_id, name=data["name"], description=data.get("description"))
    session.add(chain)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(
            f"a chain named {data['name']!r} exists already",
            hint="choose another name, or PATCH the existing chain (a new version)",
        ) from exc
    _add_version(session, principal, chain, definition, data.get("version", FIRST_VERSION))
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change("chain.create", "chain", chain.id, chain.name),
    )
    return chain


def update(
    session: Session,
    principal: Principal,
    ref: str,
    data: dict[str, Any],
    *,
    changelog: str | None = None,
) -> Chain:
    """Apply a PATCH; a versioned change makes a new version, carrying `changelog`."""
    principal.require("agents:write")
    chain = resolve(session, principal, ref)
    if chain.archived_at is not None:
        raise Conflict(f"chain {chain.name!r} is archived", hint="archived chains cannot change")
    current = current_version(session, chain)
    definition = {name: getattr(current, name) for name in VERSIONED_FIELDS}
    changed = {name: data[name] for name in VERSIONED_FIELDS if name in data}
    merged = {**definition, **changed}
    check_definition(session, principal, {"name": chain.name, **merged, **_unversioned(data)})
    before = audited_state(session, chain)
    if "description" in data:
        chain.description = data["description"]
        chain.updated_at = utcnow()
    if merged == definition:
        refuse_changelog(changelog, "input_schema, steps or on_failure")
        if "version" in data and data["version"] != current.version:
            raise ValidationFailed(
                "nothing versioned changed, so there is no new version to number",
                errors={
                    "/version": ["only given with a change to input_schema, steps or on_failure"]
                },
            )
        session.flush()
    else:
        version = next_version(session, ChainVersion.chain_id, chain, data.get("version"))
        _add_version(session, principal, chain, merged, version, changelog)
    after = audited_state(session, chain)
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change(
            "chain.update", "chain", chain.id, chain.name, audit.changes_between(before, after)
        ),
    )
    return chain


def _unversioned(data: dict[str, Any]) -> dict[str, Any]:
    return {name: data[name] for name in ("description", "version") if name in data}


def archive(session: Session, principal: Principal, ref: str) -> None:
    principal.require("agents:write")
    chain = resolve(session, principal, ref)
    if chain.archived_at is None:
        chain.archived_at = utcnow()
        chain.updated_at = chain.archived_at
        session.flush()
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change("chain.archive", "chain", chain.id, chain.name),
    )


def list_chains(
    session: Session, principal: Principal, *, include_archived: bool, offset: int, limit: int
) -> tuple[list[Chain], int]:
    query = select(Chain).where(Chain.org_id == principal.org_id)
    if not include_archived:
        query = query.where(Chain.archived_at.is_(None))
    return page(session, query, Chain.created_at.desc(), Chain.id, offset=offset, limit=limit)


def list_versions(
    session: Session, principal: Principal, ref: str, *, offset: int, limit: int
) -> tuple[list[ChainVersion], int]:
    chain = resolve(session, principal, ref)
    query = select(ChainVersion).where(ChainVersion.chain_id == chain.id)
    return page(
        session,
        query,
        ChainVersion.major.desc(),
        ChainVersion.minor.desc(),
        ChainVersion.patch.desc(),
        offset=offset,
        limit=limit,
    )


def get_version(session: Session, principal: Principal, ref: str, version: str) -> ChainVersion:
    chain = resolve(session, principal, ref)
    row = session.scalar(
        select(ChainVersion).where(
            ChainVersion.chain_id == chain.id, ChainVersion.version == version
        )
    )
    if row is None:
        raise NotFound(
            f"chain {chain.name!r} has no version {version!r}",
            hint=f"GET /api/v1/chains/{chain.name}/versions lists them",
        )
    return row


def describe(session: Session, chain: Chain) -> dict[str, Any]:
    version = current_version(session, chain)
    return {
        "id": chain.id,
        "name": chain.name,
        "description": chain.description,
        **{name: getattr(version, name) for name in VERSIONED_FIELDS},
        "current_version": chain.current_version,
        "created_at": chain.created_at,
        "updated_at": chain.updated_at,
        "archived_at": chain.archived_at,
    }


def archived(chain: Chain) -> Conflict:
    return Conflict(
        f"chain {chain.name!r} is archived and takes no new executions",
        hint="GET /api/v1/chains lists the chains that take executions; an archived "
        "chain's past executions stay readable",
    )


# ---------------------------------------------------------------------------------------------
# Reading chain executions


def get_execution(
    session: Session, principal: Principal, chain_execution_id: str
) -> ChainExecution:
    try:
        parsed = uuid.UUID(chain_execution_id)
    except ValueError as exc:
        raise NotFound(
            f"no chain execution {chain_execution_id!r}: not a chain execution id",
            hint="chain execution ids are UUIDs; GET /api/v1/chain-executions lists them",
        ) from exc
    found = session.scalar(
        select(ChainExecution).where(
            ChainExecution.id == parsed, ChainExecution.org_id == principal.org_id
        )
    )
    if found is None:
        raise NotFound(
            f"no chain execution {chain_execution_id}",
            hint="GET /api/v1/chain-executions lists them",
        )
    return found


def present(session: Session, execution: ChainExecution) -> dict[str, Any]:
    plan = plans.get(session.connection(), execution.chain_version_id)
    rows = session.scalars(
        select(Execution)
        .where(Execution.chain_execution_id == execution.id)
        .order_by(Execution.chain_stage, Execution.chain_step)
    ).all()
    by_key = {(row.chain_role, row.chain_step): row for row in rows}
    active = execution.status in ("queued", "running")
    steps = [
        _step_entry(
            step.name,
            step.stage,
            by_key.get(("step", step.index)),
            "pending" if active else "skipped",
        )
        for step in plan.steps
    ]
    # Apart from the steps, so a client reading a step by its name never finds its compensation.
    pending = "pending" if execution.status == "compensating" else "skipped"
    compensations = [
        _step_entry(
            plan.steps[index].name,
            len(plan.stages) + position,
            by_key.get(("compensate", index)),
            pending,
        )
        for position, index in enumerate(execution.compensation or [])
    ]
    started, finished = execution.started_at, execution.finished_at
    return {
        "id": execution.id,
        "chain_id": execution.chain_id,
        "chain_name": execution.chain_name,
        "chain_version": execution.chain_version,
        "status": execution.status,
        "priority": execution.priority,
        "input": execution.input,
        "output": execution.output,
        "error": execution.error,
        "rerun_of": execution.rerun_of,
        "steps": steps,
        "compensations": compensations,
        "queued_at": execution.queued_at,
        "started_at": started,
        "finished_at": finished,
        "duration_ms": (
            round((finished - started).total_seconds() * 1000) if started and finished else None
        ),
        "created_by": execution.created_by,
    }


def reused(row: Execution) -> bool:
    """A step a rerun reused: its row succeeded with no attempt, as no worker ran it (its
    rerun_of names the original step's execution while that one is kept)."""
    return row.status == "succeeded" and row.attempt == 0


def _step_entry(name: str, stage: int, row: Execution | None, missing: str) -> dict:
    return {
        "name": name,
        "stage": stage,
        "status": ("reused" if reused(row) else row.status) if row else missing,
        "execution_id": row.id if row else None,
        "agent_name": row.agent_name if row else None,
        "agent_version": row.agent_version if row else None,
        "attempts": row.attempt if row else 0,
        "started_at": row.started_at if row else None,
        "finished_at": row.finished_at if row else None,
    }


def list_executions(
    session: Session,
    principal: Principal,
    *,
    chain: str | None,
    status: str | None,
    offset: int,
    limit: int,
) -> tuple[list[ChainExecution], int]:
    query = select(ChainExecution).where(ChainExecution.org_id == principal.org_id)
    if chain:
        query = query.where(ChainExecution.chain_id == resolve(session, principal, chain).id)
    if status:
        query = query.where(ChainExecution.status == status)
    return page(
        session,
        query,
        ChainExecution.queued_at.desc(),
        ChainExecution.id.desc(),
        offset=offset,
        limit=limit,
    )
