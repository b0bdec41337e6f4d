"""Chains: definitions and versions, chain executions, and how a chain moves on.

A chain execution runs as a Celery canvas of `runyard.chain_step` tasks built from its plan:
sequential steps as a chain, a `parallel` group as a group, the step after it as the chord body.
PostgreSQL, not the canvas, knows where a chain stands:

- A step's execution row is created when the step starts (`start_step`), with its input read
  from the chain's state in PostgreSQL. Its id is derived from (chain execution, stage, step),
  so a duplicate message finds the row taken and does nothing. Rows of steps that may not run
  yet do not exist, so the executions sweeper never sees them.
- A step starts only once every step of the stage before it has finished; under
  on_failure=stop, only once they all succeeded (otherwise it stops the chain instead).
- Whoever records a step's last outcome moves the chain on: inside the canvas the next task is
  already on its way; outside it (a retry ran as a plain execution, a message was lost) the
  rest of the canvas is published again from the first stage that has not run
  (`reconcile`). A duplicate step message is harmless, a missing one is found by
  `resume_stalled` (beat) and published again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import jsonschemas
from app.agents.models import Agent, AgentVersion
from app.agents.services import FIRST_VERSION, parse_semver
from app.chains import definitions
from app.chains.definitions import AgentSchemas, Plan, Problems, Step
from app.chains.models import ACTIVE_CHAIN_STATUSES, Chain, ChainExecution, ChainVersion
from app.config import current_config
from app.db import db, page, utcnow
from app.errors import Conflict, NotFound, ValidationFailed
from app.executions import services as executions
from app.executions.models import TERMINAL_STATUSES, Execution
from app.executions.services import error_body
from app.orgs.services import Principal

log = logging.getLogger(__name__)

STEP_TASK = "runyard.chain_step"
FAILED_STATUSES = ("failed", "timed_out", "cancelled")
LIVE_STATUSES = ("queued", "running")
VERSIONED_FIELDS = ("input_schema", "steps", "on_failure")
STEP_NAMESPACE = uuid.UUID("6f1d4c1e-8a51-4f55-9d0e-2c6a4e1b7a90")


def step_execution_id(chain_execution_id: uuid.UUID, stage: int, index: int) -> uuid.UUID:
    """The id of a step's execution row: the same for every message that could start it."""
    return uuid.uuid5(STEP_NAMESPACE, f"{chain_execution_id}:{stage}:{index}")


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


def _agent_version(
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


def _check_definition(session: Session, principal: Principal, document: dict[str, Any]) -> Resolved:
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
        row, why = _agent_version(session, principal.org_id, step.agent, step.version)
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
            compensator, why = _agent_version(
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
        definitions.check_types(plan, document["input_schema"], agents, compensators, problems)
    problems.raise_if_any()
    return Resolved(plan, step_versions, compensate_versions)  # type: ignore[arg-type]


def _add_version(
    session: Session, chain: Chain, definition: dict[str, Any], version: str
) -> ChainVersion:
    major, minor, patch = parse_semver(version)
    row = ChainVersion(
        chain_id=chain.id,
        org_id=chain.org_id,
        version=version,
        major=major,
        minor=minor,
        patch=patch,
        **definition,
    )
    session.add(row)
    session.flush()
    chain.current_version_id = row.id
    chain.current_version = version
    chain.updated_at = utcnow()
    session.flush()
    return row


def _definition(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "input_schema": data.get("input_schema", {"type": "object"}),
        "steps": data["steps"],
        "on_failure": data.get("on_failure", "stop"),
    }


def create(session: Session, principal: Principal, data: dict[str, Any]) -> Chain:
    principal.require("agents:write")
    definition = _definition(data)
    _check_definition(session, principal, {**data, **definition})
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
    _add_version(session, chain, definition, data.get("version", FIRST_VERSION))
    return chain


def update(session: Session, principal: Principal, ref: str, data: dict[str, Any]) -> Chain:
    principal.require("agents:write")
    chain = resolve(session, principal, ref)
    if chain.archived_at is not None:
        raise Conflict(f"chain {chain.name!r} is archived", hint="archived chains cannot change")
    current = current_version(session, chain)
    definition = {name: getattr(current, name) for name in VERSIONED_FIELDS}
    changed = {name: data[name] for name in VERSIONED_FIELDS if name in data}
    merged = {**definition, **changed}
    _check_definition(session, principal, {"name": chain.name, **merged, **_unversioned(data)})
    if "description" in data:
        chain.description = data["description"]
        chain.updated_at = utcnow()
    if merged == definition:
        if "version" in data and data["version"] != current.version:
            raise ValidationFailed(
                "nothing versioned changed, so there is no new version to number",
                errors={
                    "/version": ["only given with a change to input_schema, steps or on_failure"]
                },
            )
        session.flush()
        return chain
    latest = session.execute(
        select(ChainVersion.major, ChainVersion.minor, ChainVersion.patch)
        .where(ChainVersion.chain_id == chain.id)
        .order_by(ChainVersion.major.desc(), ChainVersion.minor.desc(), ChainVersion.patch.desc())
        .limit(1)
    ).one()
    if "version" in data:
        if parse_semver(data["version"]) <= tuple(latest):
            raise ValidationFailed(
                f"version {data['version']} is not above the latest, {'.'.join(map(str, latest))}",
                errors={"/version": ["must be greater than every existing version"]},
            )
        version = data["version"]
    else:
        version = f"{latest[0]}.{latest[1]}.{latest[2] + 1}"
    _add_version(session, chain, merged, version)
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


# ---------------------------------------------------------------------------------------------
# Plans, cached per process: chain versions never change.


class PlanCache:
    def __init__(self, max_entries: int = 512) -> None:
        self._entries: OrderedDict[uuid.UUID, Plan] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def get(self, conn: Connection, version_id: uuid.UUID) -> Plan:
        plan = self._entries.get(version_id)
        if plan is None:
            row = conn.execute(
                text("SELECT steps, on_failure FROM chain_versions WHERE id = :id"),
                {"id": version_id},
            ).one()
            plan = definitions.plan_for(row.steps, row.on_failure)
            with self._lock:
                self._entries[version_id] = plan
                if len(self._entries) > self._max:
                    self._entries.popitem(last=False)
        return plan


plans = PlanCache()


# ---------------------------------------------------------------------------------------------
# Submit


def archived(chain: Chain) -> Conflict:
    return Conflict(
        f"chain {chain.name!r} is archived and takes no new executions",
        hint="GET /api/v1/chains lists the chains that take executions; an archived "
        "chain's past executions stay readable",
    )


def submit(
    session: Session,
    principal: Principal,
    ref: str,
    payload: dict[str, Any],
    *,
    version: str | None = None,
    priority: int = executions.DEFAULT_PRIORITY,
) -> ChainExecution:
    principal.require("executions:submit")
    chain = resolve(session, principal, ref)
    if chain.archived_at is not None:
        raise archived(chain)
    chain_version = (
        get_version(session, principal, ref, version)
        if version
        else current_version(session, chain)
    )
    execution = new_execution(
        session, principal.org_id, chain, chain_version, payload, priority=priority
    )
    session.add(execution)
    session.commit()
    db.after_commit(_publish_submitted, execution.id, chain_version.id)
    return execution


def _publish_submitted(chain_execution_id: uuid.UUID, chain_version_id: uuid.UUID) -> None:
    with db.hot() as conn:
        publish_committed(conn, chain_execution_id, chain_version_id)


def new_execution(
    session: Session,
    org_id: uuid.UUID,
    chain: Chain,
    chain_version: ChainVersion,
    payload: Any,
    *,
    execution_id: uuid.UUID | None = None,
    priority: int = executions.DEFAULT_PRIORITY,
) -> ChainExecution:
    """A queued chain execution, checked (input 422, a step that cannot run 409) but not added
    to any session: the caller inserts it in its own transaction, commits, then calls
    publish_committed. submit does this; so do schedules and webhook triggers."""
    errors = jsonschemas.instance_errors(
        jsonschemas.validator_for(chain_version.input_schema), payload, "/input"
    )
    if errors:
        raise ValidationFailed(
            "the input does not match the chain's input_schema",
            errors=errors,
            hint=f"GET /api/v1/chains/{chain.name} shows the input_schema",
        )
    plan = definitions.plan_for(chain_version.steps, chain_version.on_failure)
    step_versions, compensate_versions = [], []
    for step in plan.steps:
        row, why = _agent_version(session, org_id, step.agent, step.version)
        if row is None:
            raise Conflict(
                f"step {step.name!r} cannot run: {why}",
                hint="PATCH the chain (a new version) to use another agent or version",
            )
        step_versions.append(str(row.id))
        compensator = None
        if step.compensate is not None:
            compensator, why = _agent_version(
                session, org_id, step.compensate["agent"], step.compensate.get("version")
            )
            if compensator is None:
                raise Conflict(
                    f"the compensation of step {step.name!r} cannot run: {why}",
                    hint="PATCH the chain (a new version) to give the step another compensate "
                    "agent or version",
                )
        compensate_versions.append(str(compensator.id) if compensator else None)
    return ChainExecution(
        id=execution_id or uuid.uuid4(),
        org_id=org_id,
        chain_id=chain.id,
        chain_version_id=chain_version.id,
        chain_name=chain.name,
        chain_version=chain_version.version,
        status="queued",
        priority=priority,
        input=payload,
        step_versions=step_versions,
        compensate_versions=compensate_versions,
    )


def publish_committed(
    conn: Connection, chain_execution_id: uuid.UUID, chain_version_id: uuid.UUID
) -> None:
    """Publish a chain execution whose row is committed: a step task never sees a chain the
    database lacks. A failed publish loses nothing: resume_stalled publishes the chain once it
    has been quiet a while."""
    try:
        publish_from(conn, chain_execution_id, chain_version_id, 0)
    except Exception:
        log.warning("publishing chain execution %s failed; it will be resumed", chain_execution_id)


# ---------------------------------------------------------------------------------------------
# Canvases


def _signature(
    celery_app, conn: Connection, chain_execution_id, chain_version_id, stage, index, version_id
):
    spec = executions.specs.get(conn, uuid.UUID(version_id))
    return celery_app.signature(
        STEP_TASK,
        args=[str(chain_execution_id), str(chain_version_id), stage, index],
        queue=spec.queue,
        immutable=True,
        # Results live in PostgreSQL: no result channel to subscribe to per message. A chord
        # still counts its header tasks in the result backend.
        ignore_result=True,
        soft_time_limit=spec.soft_time_limit,
        time_limit=spec.soft_time_limit + executions.HARD_LIMIT_GRACE_SECONDS,
    )


def _canvas(stages: list[list[Any]]):
    """A Celery chain of the stages; a stage of several steps is a group, and Celery makes the
    step after a group its chord body."""
    from celery import chain, group

    parts = [members[0] if len(members) == 1 else group(members) for members in stages if members]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else chain(*parts)


def publish_from(
    conn: Connection,
    chain_execution_id: uuid.UUID,
    chain_version_id: uuid.UUID,
    stage: int,
    *,
    skip: frozenset[tuple[int, int]] = frozenset(),
    declare: bool = False,
) -> bool:
    """Publish the rest of a chain execution's canvas from `stage`: its remaining steps, or its
    remaining compensations when `stage` is past the last step stage. Steps in `skip`
    (stage, index) already have rows."""
    from workers import app as celery_app

    row = conn.execute(
        text(
            "SELECT step_versions, compensate_versions, compensation, priority "
            "FROM chain_executions WHERE id = :id"
        ),
        {"id": chain_execution_id},
    ).one()
    plan = plans.get(conn, chain_version_id)
    last = len(plan.stages)
    stages: list[list[Any]] = []
    queues: set[str] = set()
    wanted: list[list[tuple[int, int, str]]] = []
    if stage < last:
        for number in range(stage, last):
            wanted.append(
                [
                    (number, index, row.step_versions[index])
                    for index in plan.stages[number]
                    if (number, index) not in skip
                ]
            )
    else:
        for position in range(stage - last, len(row.compensation or [])):
            index = row.compensation[position]
            wanted.append([(last + position, index, row.compensate_versions[index])])
    for members in wanted:
        signatures = []
        for number, index, version_id in members:
            signature = _signature(
                celery_app, conn, chain_execution_id, chain_version_id, number, index, version_id
            )
            signature.set(priority=9 - row.priority)
            queues.add(signature.options["queue"])
            signatures.append(signature)
        stages.append(signatures)
    canvas = _canvas(stages)
    if canvas is None:
        return False
    if declare:
        _declare(celery_app, queues)
    canvas.apply_async()
    return True


def _declare(celery_app, queues: set[str]) -> None:
    """Bind the queues again. A broker that lost its data lost the bindings too, and a
    publisher that declared them once never declares them again: its messages would be dropped
    as unroutable."""
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        for name in queues:
            celery_app.amqp.queues[name](channel).declare()


# ---------------------------------------------------------------------------------------------
# Running a step (the worker side)


_STATE_SQL = """
    SELECT ce.status, ce.input, ce.step_versions, ce.compensate_versions,
           (SELECT count(*) FROM executions p
            WHERE p.chain_execution_id = ce.id AND p.chain_stage = %(previous)s
              AND p.status IN ('succeeded', 'failed', 'timed_out', 'cancelled')) AS previous_done,
           (SELECT count(*) FROM executions p
            WHERE p.chain_execution_id = ce.id AND p.chain_stage = %(previous)s
              AND p.status = 'succeeded') AS previous_succeeded,
           (SELECT e.status FROM executions e WHERE e.id = %(id)s) AS own_status,
           (SELECT a.archived_at IS NOT NULL FROM agent_versions v
            JOIN agents a ON a.id = v.agent_id
            WHERE v.id = (ce.step_versions ->> %(index)s)::uuid) AS archived,
           -- Only outputs of steps that succeeded: a failed step's output reads as absent.
           (SELECT jsonb_object_agg(p.chain_step, p.output) FROM executions p
            WHERE p.chain_execution_id = ce.id AND p.chain_role = 'step'
              AND p.status = 'succeeded' AND p.chain_step = ANY(%(needed)s)) AS outputs
    FROM chain_executions ce WHERE ce.id = %(chain_execution_id)s
"""

_START_SQL = """
    INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version, status,
                            priority, input, attempt, max_attempts, dispatched_at, error,
                            finished_at, chain_execution_id, chain_step, chain_stage, chain_role)
    SELECT %(id)s, ce.org_id, %(agent_id)s, %(version_id)s, %(agent_name)s, %(agent_version)s,
           %(status)s, ce.priority, %(input)s, 0, %(max_attempts)s, now(), %(error)s,
           CASE WHEN %(refused)s THEN now() END, ce.id, %(step)s, %(stage)s, %(role)s
    FROM chain_executions ce
    WHERE ce.id = %(chain_execution_id)s AND ce.status = ANY(%(statuses)s)
    FOR KEY SHARE OF ce
    ON CONFLICT (id) DO NOTHING
    RETURNING id
"""


@dataclass(frozen=True)
class StepStart:
    """What a step task does next: run `execution_id`; or, with None, nothing, unless `settled`
    says the step was recorded at once (its input was refused) and the chain moves on from it."""

    execution_id: uuid.UUID | None
    settled: str | None = None


def start_step(
    chain_execution_id: uuid.UUID, chain_version_id: uuid.UUID, stage: int, index: int
) -> StepStart:
    """Create the step's execution row from the chain's state, if its turn has come."""
    execution_id = step_execution_id(chain_execution_id, stage, index)
    with db.hot() as conn:
        plan = plans.get(conn, chain_version_id)
        last = len(plan.stages)
        step = plan.steps[index]
        compensating = stage >= last
        template = (step.compensate or {}).get("input") if compensating else step.input
        if (
            not compensating
            and template is None
            and (stage == 0 or len(plan.stages[stage - 1]) == 1)
        ):
            started = _start_plain_step(conn, chain_execution_id, plan, stage, index, execution_id)
            if started is not None:
                return started
        # A compensation without `input` reads the output of the step it undoes.
        needed = [index] if compensating and template is None else plan.needed_steps(step, template)
        driver = executions._driver(conn)
        state = driver.execute(
            _STATE_SQL,
            {
                "chain_execution_id": chain_execution_id,
                "id": execution_id,
                "previous": stage - 1,
                "needed": needed,
                "index": index,
            },
        ).fetchone()
        if state is None:
            return StepStart(None)
        status, chain_input, step_versions, compensate_versions = state[:4]
        previous_done, previous_succeeded, own_status, archived, outputs = state[4:]
        if own_status is not None:
            # A message that arrives again: run what is still queued (the claim decides), leave
            # the rest to whoever holds it.
            return StepStart(execution_id if own_status == "queued" else None)
        allowed = ("compensating",) if compensating else ("queued", "running")
        if status not in allowed:
            return StepStart(None)
        if compensating:
            ready = stage == last or previous_done == 1
        else:
            ready = stage == 0 or previous_done == len(plan.stages[stage - 1])
        if not ready:
            return StepStart(None)
        stopped = (
            not compensating
            and stage > 0
            and plan.on_failure == "stop"
            and previous_succeeded < previous_done
        )
        if not stopped:
            outputs = {int(key): value for key, value in (outputs or {}).items()}
            return _insert_step(
                conn,
                plan,
                step,
                stage,
                execution_id,
                chain_execution_id,
                status,
                allowed,
                uuid.UUID(compensate_versions[index] if compensating else step_versions[index]),
                outputs.get(index)
                if compensating and template is None
                else definitions.step_input(plan, step, template, chain_input, outputs),
                # A compensation runs even so: it undoes work done, which must not stay.
                archived=archived and not compensating,
            )
    # A step before this one failed under on_failure=stop and nothing has acted on it yet (the
    # reconcile after it failed, say): this step must not run. Stop the chain now instead.
    reconcile(chain_execution_id, in_canvas=False)
    return StepStart(None)


def _insert_step(
    conn: Connection,
    plan: Plan,
    step: Step,
    stage: int,
    execution_id: uuid.UUID,
    chain_execution_id: uuid.UUID,
    chain_status: str,
    allowed: tuple[str, ...],
    version_id: uuid.UUID,
    payload: Any,
    *,
    archived: bool = False,
) -> StepStart:
    """Insert the step's row, `queued` to run or already `failed` when it is refused (its
    input, or its agent archived since the chain started): one statement, so no crash leaves a
    refused step queued for a redelivered message to run."""
    spec = executions.specs.get(conn, version_id)
    if archived:
        error = error_body(
            "agent_archived",
            f"step {step.name!r} did not run: agent {spec.agent_name!r} was archived after the "
            "chain execution started, and an archived agent takes no new executions",
            "restore the agent or PATCH the chain (a new version) to use another one, then "
            "submit the chain again",
        )
    else:
        error = _input_error(plan, step, stage, spec, payload)
    if stage == 0 and chain_status == "queued":
        conn.execute(
            text(
                "UPDATE chain_executions SET status = 'running', started_at = now() "
                "WHERE id = :id AND status = 'queued'"
            ),
            {"id": chain_execution_id},
        )
    started = (
        executions._driver(conn)
        .execute(
            _START_SQL,
            {
                "id": execution_id,
                "chain_execution_id": chain_execution_id,
                "agent_id": spec.agent_id,
                "version_id": spec.id,
                "agent_name": spec.agent_name,
                "agent_version": spec.version,
                "status": "failed" if error else "queued",
                "refused": error is not None,
                "input": Jsonb(payload if isinstance(payload, dict) else {}),
                "max_attempts": spec.max_attempts,
                "error": Jsonb(error) if error else None,
                "step": step.index,
                "stage": stage,
                "role": "compensate" if stage >= len(plan.stages) else "step",
                "statuses": list(allowed),
            },
        )
        .fetchone()
    )
    if started is None:
        return StepStart(None)
    if error:
        return StepStart(None, settled="failed")
    return StepStart(execution_id)


_JSON_TYPES = {list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}


def _input_error(
    plan: Plan, step: Step, stage: int, spec: executions.VersionSpec, payload: Any
) -> dict | None:
    """Why the input built for a step cannot be run, or None."""
    what = "compensation of step" if stage >= len(plan.stages) else "step"
    if payload is None:
        return error_body(
            "input_invalid",
            f"the {what} {step.name!r} has no input: the output it reads is absent "
            "(the step that produces it did not succeed)",
            "under on_failure=continue a failed step's output reads as absent; give the step "
            "an `input` that does not need it, or use on_failure=stop",
        )
    if not isinstance(payload, dict):
        return error_body(
            "input_invalid",
            f"the input built for the {what} {step.name!r} is a JSON "
            f"{_JSON_TYPES.get(type(payload), type(payload).__name__)}, not an object",
            "an agent's input is a JSON object: reference an object, or build one in `input`",
        )
    errors = jsonschemas.instance_errors(spec.input_validator, payload, "/input")
    if not errors:
        return None
    details = "; ".join(f"{p}: {', '.join(m)}" for p, m in errors.items())
    return error_body(
        "input_invalid",
        f"the input built for the {what} {step.name!r} does not match the agent's "
        f"input_schema: {details}",
        "the step's execution shows the input it was given",
    )


# The common step (no `input`: it takes the chain input or the one step before it, which
# succeeded): ready and input in one statement, with the agent version it runs. Anything else
# (the step before failed, the row exists already) goes the general way, which finds out why.
#
# The insert locks the chain execution's row FOR KEY SHARE (the lock the foreign key takes
# anyway): a reconcile or a cancel holds it FOR UPDATE while it stops the chain, so an insert
# either lands before (and is seen as under way) or waits and then finds the chain stopped.
_PLAIN_INPUT_SQL = """
    SELECT ce.status, v.id, CASE WHEN %(stage)s = 0 THEN ce.input ELSE p.output END,
           a.archived_at IS NOT NULL
    FROM chain_executions ce
    JOIN agent_versions v ON v.id = (ce.step_versions ->> %(step)s)::uuid
    JOIN agents a ON a.id = v.agent_id
    LEFT JOIN executions p ON p.id = %(previous)s
    WHERE ce.id = %(chain_execution_id)s AND ce.status IN ('queued', 'running')
      AND (%(stage)s = 0 OR p.status = 'succeeded')
      AND NOT EXISTS (SELECT 1 FROM executions e WHERE e.id = %(id)s)
"""


def _start_plain_step(
    conn: Connection,
    chain_execution_id: uuid.UUID,
    plan: Plan,
    stage: int,
    index: int,
    execution_id: uuid.UUID,
) -> StepStart | None:
    """None when the step is not plainly ready: the general path then finds out why."""
    previous = plan.stages[stage - 1][0] if stage else None
    row = (
        executions._driver(conn)
        .execute(
            _PLAIN_INPUT_SQL,
            {
                "id": execution_id,
                "chain_execution_id": chain_execution_id,
                "stage": stage,
                "step": index,
                "previous": (
                    step_execution_id(chain_execution_id, stage - 1, previous) if stage else None
                ),
            },
        )
        .fetchone()
    )
    if row is None:
        return None
    chain_status, version_id, payload, archived = row
    return _insert_step(
        conn,
        plan,
        plan.steps[index],
        stage,
        execution_id,
        chain_execution_id,
        chain_status,
        ("queued", "running"),
        version_id,
        payload,
        archived=archived,
    )


_FINISH_FAST_SQL = """
    UPDATE chain_executions ce
    SET status = 'succeeded', finished_at = now(),
        output = (SELECT output FROM executions WHERE id = %(execution_id)s)
    WHERE ce.id = %(chain_execution_id)s AND ce.status = 'running'
      AND NOT EXISTS (SELECT 1 FROM executions e WHERE e.chain_execution_id = ce.id
                      AND e.chain_role = 'step' AND e.status <> 'succeeded')
"""


def step_settled(
    chain_execution_id: uuid.UUID,
    chain_version_id: uuid.UUID | None,
    stage: int | None,
    execution_id: uuid.UUID,
    status: str,
    *,
    in_canvas: bool,
) -> bool:
    """A step's outcome is recorded: move the chain on. True when the canvas the step ran in
    may carry on with its next task; outside a canvas the rest is published from here.
    A connection is taken only if a statement is needed."""
    if status not in TERMINAL_STATUSES:
        return False  # back in the queue for a retry: whoever records its end moves on
    if in_canvas and status == "succeeded" and chain_version_id is not None and stage is not None:
        with _lazy_connection() as usable:
            plan = plans.get(usable, chain_version_id)
            last = len(plan.stages) - 1
            if stage < last and len(plan.stages[stage]) == 1:
                return True  # the common case costs no statement: the next task is the next step
            if stage == last and len(plan.stages[stage]) == 1:
                cursor = executions._driver(usable).execute(
                    _FINISH_FAST_SQL,
                    {"chain_execution_id": chain_execution_id, "execution_id": execution_id},
                )
                if cursor.rowcount == 1:
                    return False
    return reconcile(chain_execution_id, in_canvas=in_canvas)


class _LazyConnection:
    """Checks a connection out of the pool only when a statement needs one."""

    def __init__(self) -> None:
        self._scope = contextlib.ExitStack()
        self._conn: Connection | None = None

    def __getattr__(self, name: str):
        if self._conn is None:
            self._conn = self._scope.enter_context(db.hot())
        return getattr(self._conn, name)


@contextlib.contextmanager
def _lazy_connection():
    lazy = _LazyConnection()
    with lazy._scope:
        yield lazy


@dataclass
class _Row:
    stage: int
    step: int
    role: str
    status: str
    output: Any
    error: Any


@dataclass(frozen=True)
class Continuation:
    """The rest of a canvas to publish once the transaction that decided it has committed."""

    chain_version_id: uuid.UUID
    stage: int
    skip: frozenset[tuple[int, int]] = frozenset()


def reconcile(chain_execution_id: uuid.UUID, *, in_canvas: bool) -> bool:
    """Bring a chain execution in line with its steps' rows: finish it, stop it, start its
    compensations, or (outside a canvas) publish what should run next. True when the canvas
    a step ran in may carry on.

    One transaction holding the chain execution's row lock, so two steps finishing at once
    decide one after the other; what it publishes goes out after the commit, so a step task
    always sees the state that sent it."""
    return _reconcile_and_publish(chain_execution_id, in_canvas=in_canvas)[0]


def _reconcile_and_publish(
    chain_execution_id: uuid.UUID, *, in_canvas: bool, resuming: bool = False
) -> tuple[bool, bool]:
    """(whether the canvas may carry on, whether anything was published)."""
    continuations: list[Continuation] = []
    with db.begin() as conn:
        proceed = _reconcile(conn, chain_execution_id, in_canvas, continuations)
        if resuming:
            conn.execute(
                text("UPDATE chain_executions SET resume_checked_at = now() WHERE id = :id"),
                {"id": chain_execution_id},
            )
    # Inside a keyed request (a cancel) the commit is the request's: publish after it.
    published = bool(
        continuations and db.after_commit(_publish_continuations, chain_execution_id, continuations)
    )
    return proceed, published


def _publish_continuations(
    chain_execution_id: uuid.UUID, continuations: list[Continuation]
) -> bool:
    published = False
    with db.hot() as conn:
        for item in continuations:
            published |= publish_from(
                conn,
                chain_execution_id,
                item.chain_version_id,
                item.stage,
                skip=item.skip,
                declare=True,
            )
    return published


def _reconcile(
    conn: Connection,
    chain_execution_id: uuid.UUID,
    in_canvas: bool,
    continuations: list[Continuation],
) -> bool:
    ce = conn.execute(
        text(
            "SELECT status, chain_version_id, compensation FROM chain_executions "
            "WHERE id = :id FOR UPDATE"
        ),
        {"id": chain_execution_id},
    ).one_or_none()
    if ce is not None and ce.status == "cancelled":
        _note_cancelled_with_chain(conn, chain_execution_id)
    if ce is None or ce.status not in ACTIVE_CHAIN_STATUSES:
        return False
    plan = plans.get(conn, ce.chain_version_id)
    rows = [
        _Row(*row)
        for row in conn.execute(
            text(
                "SELECT chain_stage, chain_step, chain_role, status, output, error "
                "FROM executions WHERE chain_execution_id = :id"
            ),
            {"id": chain_execution_id},
        )
    ]
    steps = {row.step: row for row in rows if row.role == "step"}
    live = [row for row in rows if row.status in LIVE_STATUSES]
    last = len(plan.stages)
    if ce.status != "compensating":
        failed = [row for row in steps.values() if row.status in FAILED_STATUSES]
        if failed and plan.on_failure == "stop":
            first = plan.steps[failed[0].step]
            message = (failed[0].error or {}).get("message", "")
            _update(
                conn,
                chain_execution_id,
                "status = 'compensating', error = :error",
                error={
                    "type": "step_failed",
                    "message": f"step {first.name!r} {failed[0].status}: {message}",
                    "hint": "the step's execution holds its error and logs; later steps were "
                    "skipped and the compensations of the steps that succeeded run",
                },
            )
            return _compensate(
                conn, chain_execution_id, ce.chain_version_id, plan, steps, live, continuations
            )
        for number, members in enumerate(plan.stages):  # noqa: B007 - used after the loop
            if not all(i in steps and steps[i].status in TERMINAL_STATUSES for i in members):
                break
        else:
            _finish(conn, chain_execution_id, plan, steps)
            return False
        if any(row.stage == number for row in live):
            return in_canvas  # its other steps are under way
        if in_canvas:
            return True
        skip = frozenset((number, i) for i in plan.stages[number] if i in steps)
        continuations.append(Continuation(ce.chain_version_id, number, skip))
        return False
    if ce.compensation is None:
        return _compensate(
            conn, chain_execution_id, ce.chain_version_id, plan, steps, live, continuations
        )
    done = {row.stage - last: row for row in rows if row.role == "compensate"}
    for position in range(len(ce.compensation)):
        row = done.get(position)
        if row is None or row.status not in TERMINAL_STATUSES:
            break
    else:
        failed = [row for row in done.values() if row.status != "succeeded"]
        _update(
            conn,
            chain_execution_id,
            "status = 'failed', finished_at = now(), error = jsonb_set(error, '{message}', "
            "to_jsonb(concat(error ->> 'message', CAST(:note AS text))))",
            note=f" (compensations: {len(failed)} of {len(done)} failed, "
            + ", ".join(repr(plan.steps[row.step].name) for row in failed)
            + ")"
            if failed
            else f" (compensations: all {len(done)} succeeded)",
        )
        return False
    if position in done:
        return in_canvas
    if in_canvas:
        return True
    continuations.append(Continuation(ce.chain_version_id, last + position))
    return False


def _note_cancelled_with_chain(conn: Connection, chain_execution_id: uuid.UUID) -> None:
    """A step that was running when its chain was cancelled was stopped by its worker, which
    tells how (the chain is not its business): say why, keeping how."""
    conn.execute(
        text(
            "UPDATE executions SET error = jsonb_set(error, '{message}', to_jsonb("
            "concat('cancelled with its chain (', error ->> 'message', ')'))) "
            "WHERE chain_execution_id = :id AND status = 'cancelled' "
            "AND error ->> 'message' NOT LIKE 'cancelled with its chain%' "
            # Not a step cancelled on its own before the chain was.
            "AND finished_at >= (SELECT finished_at FROM chain_executions WHERE id = :id)"
        ),
        {"id": chain_execution_id},
    )


def _compensate(
    conn: Connection,
    chain_execution_id: uuid.UUID,
    chain_version_id: uuid.UUID,
    plan: Plan,
    steps: dict[int, _Row],
    live: list[_Row],
    continuations: list[Continuation],
) -> bool:
    """Once no step runs any more, fix the compensations (the steps that succeeded, latest
    first) and start them; with none, the chain has failed."""
    if any(row.role == "step" for row in live):
        return False  # a step still under way: the last one to finish starts them
    order = sorted(
        (
            step.index
            for step in plan.steps
            if step.compensate is not None
            and step.index in steps
            and steps[step.index].status == "succeeded"
        ),
        key=lambda i: (plan.steps[i].stage, i),
        reverse=True,
    )
    if not order:
        _update(conn, chain_execution_id, "status = 'failed', finished_at = now()")
        return False
    changed = conn.execute(
        text(
            "UPDATE chain_executions SET compensation = CAST(:order AS jsonb) "
            "WHERE id = :id AND compensation IS NULL RETURNING id"
        ),
        {"id": chain_execution_id, "order": _json(order)},
    ).first()
    if changed:
        continuations.append(Continuation(chain_version_id, len(plan.stages)))
    return False


def _json(value: Any) -> str:
    return json.dumps(value)


def _update(conn: Connection, chain_execution_id: uuid.UUID, assignments: str, **params) -> None:
    if "error" in params:
        params["error"] = _json(params["error"])
        assignments = assignments.replace(":error", "CAST(:error AS jsonb)")
    conn.execute(
        text(
            f"UPDATE chain_executions SET {assignments} "
            "WHERE id = :id AND status IN ('queued', 'running', 'compensating')"
        ),
        {"id": chain_execution_id, **params},
    )


def _finish(conn: Connection, chain_execution_id: uuid.UUID, plan: Plan, steps) -> None:
    last = plan.stages[-1]
    if len(last) == 1:
        output = steps[last[0]].output
    else:
        # A failed step's output reads as absent, as it does for the steps after it.
        output = {
            plan.steps[i].name: steps[i].output for i in last if steps[i].status == "succeeded"
        }
    failed = [plan.steps[i].name for i, row in sorted(steps.items()) if row.status != "succeeded"]
    if failed:
        _update(
            conn,
            chain_execution_id,
            "status = 'failed', finished_at = now(), output = CAST(:output AS jsonb), "
            "error = :error",
            output=_json(output),
            error={
                "type": "step_failed",
                "message": f"steps {', '.join(map(repr, failed))} failed; the chain went on "
                "(on_failure=continue)",
                "hint": "the steps' executions hold their errors and logs",
            },
        )
    else:
        _update(
            conn,
            chain_execution_id,
            "status = 'succeeded', finished_at = now(), output = CAST(:output AS jsonb)",
            output=_json(output),
        )


# ---------------------------------------------------------------------------------------------
# Resumption (run by beat)


# A chain the check looked at within the grace period is left alone: its republished messages
# may only wait behind a backlog, and a duplicate every tick would add to it. The longest unchecked
# go first, so a batch never holds the same chains tick after tick.
_STALLED_SQL = text(
    """
    SELECT ce.id FROM chain_executions ce
    WHERE ce.status IN ('queued', 'running', 'compensating')
      AND ce.queued_at < now() - make_interval(secs => :grace)
      AND (ce.resume_checked_at IS NULL
           OR ce.resume_checked_at
              < coalesce(:checked_before, now() - make_interval(secs => :grace)))
      AND NOT EXISTS (
          SELECT 1 FROM executions e
          WHERE e.chain_execution_id = ce.id
            AND (e.status IN ('queued', 'running')
                 OR e.finished_at > now() - make_interval(secs => :grace)))
    ORDER BY coalesce(ce.resume_checked_at, ce.queued_at) LIMIT :batch
    """
)


def resume_stalled(
    grace_seconds: float | None = None,
    batch: int = 100,
    checked_before: dt.datetime | None = None,
) -> list[uuid.UUID]:
    """Continue chains whose next step never arrived (a lost message, a failed publish):
    nothing under way and nothing finished for `grace_seconds`, and not checked within it (or,
    given `checked_before`, not checked since then: the sweeper's check after a broker reset
    looks at each chain once). A step message that was only slow makes a duplicate, which finds
    its row taken and does nothing. Returns the chain executions for which something was
    published."""
    grace = current_config().chain_stall_seconds if grace_seconds is None else grace_seconds
    resumed = []
    params = {"grace": grace, "batch": batch, "checked_before": checked_before}
    with db.hot() as conn:
        ids = conn.execute(_STALLED_SQL, params).scalars().all()
    for chain_execution_id in ids:
        try:
            _, published = _reconcile_and_publish(
                chain_execution_id, in_canvas=False, resuming=True
            )
        except Exception:
            log.warning("resuming chain execution %s failed", chain_execution_id, exc_info=True)
            continue
        if published:
            resumed.append(chain_execution_id)
    return resumed


# ---------------------------------------------------------------------------------------------
# Reading and cancelling (the API side)


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
        "steps": steps,
        "compensations": compensations,
        "queued_at": execution.queued_at,
        "started_at": started,
        "finished_at": finished,
        "duration_ms": (
            round((finished - started).total_seconds() * 1000) if started and finished else None
        ),
    }


def _step_entry(name: str, stage: int, row: Execution | None, missing: str) -> dict:
    return {
        "name": name,
        "stage": stage,
        "status": row.status if row else missing,
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


# FOR UPDATE first: a step insert under way finishes before (and its row is then cancelled
# below), a later one finds the chain cancelled.
_CANCEL_CHAIN = text(
    """
    WITH locked AS (SELECT id FROM chain_executions WHERE id = :id AND org_id = :org_id
                    FOR UPDATE)
    UPDATE chain_executions ce
    SET status = 'cancelled', finished_at = now(),
        error = CAST(:error AS jsonb)
    FROM locked
    WHERE ce.id = locked.id AND ce.status IN ('queued', 'running', 'compensating')
    RETURNING ce.id
    """
)


_LIVE_STEPS = text(
    "SELECT id FROM executions WHERE chain_execution_id = :id AND status IN ('queued', 'running')"
)


def request_cancel(
    conn: Connection, org_id: uuid.UUID, chain_execution_id: uuid.UUID, message: str
) -> None:
    """Cancel from inside a caller's transaction (a schedule's overlap policy cancel_other): the
    chain first, as `cancel` does, then its live steps; nothing for a finished chain."""
    params = {
        "id": chain_execution_id,
        "org_id": org_id,
        "error": _json(error_body("cancelled", message, "steps that had not started are skipped")),
    }
    if conn.execute(_CANCEL_CHAIN, params).first() is None:
        return
    live = conn.execute(_LIVE_STEPS, {"id": chain_execution_id}).scalars().all()
    executions.request_cancel(conn, org_id, list(live), "cancelled with its chain")


def cancel(session: Session, principal: Principal, chain_execution_id: str) -> ChainExecution:
    """The chain first (no step starts after this), then its running steps."""
    principal.require("executions:cancel")
    execution = get_execution(session, principal, chain_execution_id)
    with db.hot() as conn:
        done = conn.execute(
            _CANCEL_CHAIN,
            {
                "id": execution.id,
                "org_id": principal.org_id,
                "error": _json(
                    error_body(
                        "cancelled",
                        "cancelled through POST /api/v1/chain-executions/{id}/cancel",
                        "steps that had not started are skipped",
                    )
                ),
            },
        ).first()
        if done is None:
            raise Conflict(
                f"chain execution {execution.id} has finished ({execution.status}); "
                "nothing to cancel",
                hint=f"GET /api/v1/chain-executions/{execution.id} shows how it ended",
            )
        live = conn.execute(_LIVE_STEPS, {"id": execution.id}).scalars().all()
    for execution_id in live:
        with contextlib.suppress(Conflict):  # it finished meanwhile
            executions.cancel(
                session, principal, str(execution_id), reason="cancelled with its chain"
            )
    session.refresh(execution)
    return execution
