"""Starting a chain execution: check and build it, insert it, and publish its canvas once the
row is committed (a step task never sees a chain the database lacks)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from app import broker, jsonschemas
from app.audit import services as audit
from app.chains import definitions, services
from app.chains.models import Chain, ChainExecution, ChainVersion
from app.chains.plans import plans
from app.db import db
from app.errors import Conflict, ValidationFailed
from app.executions.spec import DEFAULT_PRIORITY
from app.executions.versions import specs
from app.flow import quotas
from app.orgs.services import Principal

log = logging.getLogger(__name__)


def submit(
    session: Session,
    principal: Principal,
    ref: str,
    payload: dict[str, Any],
    *,
    version: str | None = None,
    priority: int = DEFAULT_PRIORITY,
    traceparent: str | None = None,
) -> ChainExecution:
    principal.require("executions:submit")
    chain = services.resolve(session, principal, ref)
    if chain.archived_at is not None:
        raise services.archived(chain)
    chain_version = (
        services.get_version(session, principal, ref, version)
        if version
        else services.current_version(session, chain)
    )
    execution = new_execution(
        session, principal.org_id, chain, chain_version, payload, priority=priority
    )
    execution.traceparent = traceparent
    execution.created_by_token_id = principal.token_id
    execution.created_by_token_name = principal.token_name
    # Its first step is one more execution not yet started.
    quotas.admit(session.connection(), principal.org_id, executions=1)
    session.add(execution)
    session.flush()
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change("chain_execution.submit", "chain_execution", execution.id, chain.name),
    )
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
    priority: int = DEFAULT_PRIORITY,
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
        row, why = services.agent_version(session, org_id, step.agent, step.version)
        if row is None:
            raise Conflict(
                f"step {step.name!r} cannot run: {why}",
                hint="PATCH the chain (a new version) to use another agent or version",
            )
        step_versions.append(str(row.id))
        compensator = None
        if step.compensate is not None:
            compensator, why = services.agent_version(
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
    conn: Connection,
    chain_execution_id: uuid.UUID,
    chain_version_id: uuid.UUID,
    stage: int = 0,
) -> None:
    """Publish a chain execution whose row is committed, from `stage` (a rerun starts past the
    stages it reuses): a step task never sees a chain the database lacks. A failed publish
    loses nothing: resume_stalled publishes the chain once it has been quiet a while."""
    try:
        publish_from(conn, chain_execution_id, chain_version_id, stage)
    except Exception:
        log.warning("publishing chain execution %s failed; it will be resumed", chain_execution_id)


# ---------------------------------------------------------------------------------------------
# Canvases


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
    (stage, index) already have rows. With `declare`, the queues are bound again first (a
    broker that lost its data lost its bindings too)."""
    row = conn.execute(
        text(
            "SELECT step_versions, compensate_versions, compensation, priority, chain_name, "
            "chain_version FROM chain_executions WHERE id = :id"
        ),
        {"id": chain_execution_id},
    ).one()
    plan = plans.get(conn, chain_version_id)
    last = len(plan.stages)
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
    stages = [
        [
            _step_message(conn, chain_execution_id, chain_version_id, step, row, plan)
            for step in members
        ]
        for members in wanted
    ]
    return broker.send_canvas(stages, declare=declare)


def _step_message(
    conn: Connection,
    chain_execution_id: uuid.UUID,
    chain_version_id: uuid.UUID,
    step: tuple[int, int, str],
    row: Any,
    plan: definitions.Plan,
) -> broker.StepMessage:
    stage, index, version_id = step
    spec = specs.get(conn, uuid.UUID(version_id))
    return broker.StepMessage(
        chain_execution_id,
        chain_version_id,
        stage,
        index,
        queue=spec.queue,
        priority=row.priority,
        soft_time_limit=spec.soft_time_limit,
        time_limit=spec.time_limit,
        chain=row.chain_name,
        chain_version=row.chain_version,
        step=plan.steps[index].name,
        agent=spec.agent_name,
        version=spec.version,
        org=spec.org_label,
        compensation=stage >= len(plan.stages),
    )
