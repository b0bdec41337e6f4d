"""Rerunning a chain execution from a point: the steps before it are reused (their rows are
copied, `succeeded` with the original outputs, run by no worker) and the rest run anew.

The new chain execution keeps the original's chain version and the agent versions fixed for
its steps, so the reused outputs are those of the steps the rest was checked against. It starts
like a submit: the row and its reused steps are committed, then the canvas is published from
the first stage that runs (app/chains/launch.py), and steps move on as in any chain
(app/chains/steps.py, progress.py).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import services as audit
from app.chains import launch, services
from app.chains.definitions import Plan
from app.chains.models import ACTIVE_CHAIN_STATUSES, Chain, ChainExecution
from app.chains.plans import plans, step_execution_id
from app.db import db
from app.errors import Conflict, ValidationFailed
from app.executions import entries
from app.executions.models import Execution
from app.flow import quotas
from app.orgs.services import Principal

FAILED = "failed"


def _refuse(message: str, hint: str) -> ValidationFailed:
    return ValidationFailed(message, errors={"/from": [message]}, hint=hint)


def _start_stage(plan: Plan, rows: dict[tuple[str, int], Execution], start: str) -> int:
    """The stage a rerun runs from: the first stage with a step that did not succeed (`failed`:
    failed, timed out, cancelled or never ran), or the stage of the named step."""
    if start == FAILED:
        for number, members in enumerate(plan.stages):
            if any(
                ("step", i) not in rows or rows["step", i].status != "succeeded" for i in members
            ):
                return number
        raise _refuse(
            "no step failed: every step of the chain execution succeeded",
            "name the step to rerun from in `from`",
        )
    named = [step for step in plan.steps if step.name == start]
    if not named:
        raise _refuse(
            f"the chain has no step named {start!r}",
            "`from` is `failed` or the name of a step (GET /api/v1/chain-executions/{id} "
            "lists them)",
        )
    return named[0].stage


def _reused(plan: Plan, rows: dict[tuple[str, int], Execution], stage: int) -> list[Execution]:
    """The original step rows the stages before `stage` reuse: each must have succeeded and
    must not have been compensated (its output would describe work since undone)."""
    reused = []
    for number in range(stage):
        for index in plan.stages[number]:
            name = plan.steps[index].name
            row = rows.get(("step", index))
            if row is None or row.status != "succeeded":
                raise _refuse(
                    f"step {name!r} before the rerun point did not succeed: it has no output "
                    "to reuse",
                    f"rerun from {name!r} or an earlier step",
                )
            undo = rows.get(("compensate", index))
            if undo is not None and undo.status == "succeeded":
                raise _refuse(
                    f"step {name!r} was compensated when the original failed: its output "
                    "describes work that was undone",
                    f"rerun from {name!r} or an earlier step",
                )
            reused.append(row)
    return reused


def rerun(
    session: Session, principal: Principal, chain_execution_id: str, *, start: str = FAILED
) -> ChainExecution:
    principal.require("executions:submit")
    original = services.get_execution(session, principal, chain_execution_id)
    if original.status in ACTIVE_CHAIN_STATUSES:
        raise Conflict(
            f"chain execution {original.id} has not finished ({original.status}); only a "
            "finished chain execution is rerun",
            hint=f"wait for it to end, or POST /api/v1/chain-executions/{original.id}/cancel",
        )
    chain = session.get(Chain, original.chain_id)
    if chain is not None and chain.archived_at is not None:
        raise services.archived(chain)
    plan = plans.get(session.connection(), original.chain_version_id)
    rows = {
        (row.chain_role, row.chain_step): row
        for row in session.scalars(
            select(Execution).where(Execution.chain_execution_id == original.id)
        )
    }
    stage = _start_stage(plan, rows, start)
    reused = _reused(plan, rows, stage)
    execution = _copy(original, started=stage > 0)
    execution.created_by_token_id = principal.token_id
    execution.created_by_token_name = principal.token_name
    # Its first step to run is one more execution not yet started (as a submit counts it).
    quotas.admit(session.connection(), principal.org_id, executions=1)
    session.add(execution)
    session.flush()
    copies = [
        (step_execution_id(execution.id, row.chain_stage, row.chain_step), row.id) for row in reused
    ]
    if copies:
        entries.insert_reused_steps(session.connection(), execution.id, copies)
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change(
            "chain_execution.rerun",
            "chain_execution",
            execution.id,
            execution.chain_name,
            [{"op": "add", "path": "/rerun_of", "value": str(original.id)}],
        ),
    )
    session.commit()
    db.after_commit(_publish, execution.id, execution.chain_version_id, stage)
    return execution


def _copy(original: ChainExecution, *, started: bool) -> ChainExecution:
    """The new chain execution: the original's version, input, priority and agent versions.
    With reused steps it is `running` from the start: its first stages are done already."""
    fields: dict[str, Any] = {
        "status": "running" if started else "queued",
        "started_at": dt.datetime.now(dt.UTC) if started else None,
    }
    return ChainExecution(
        id=uuid.uuid4(),
        org_id=original.org_id,
        chain_id=original.chain_id,
        chain_version_id=original.chain_version_id,
        chain_name=original.chain_name,
        chain_version=original.chain_version,
        priority=original.priority,
        input=original.input,
        step_versions=original.step_versions,
        compensate_versions=original.compensate_versions,
        rerun_of=original.id,
        **fields,
    )


def _publish(chain_execution_id: uuid.UUID, chain_version_id: uuid.UUID, stage: int) -> None:
    with db.hot() as conn:
        launch.publish_committed(conn, chain_execution_id, chain_version_id, stage)
