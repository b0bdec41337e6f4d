"""Starting a chain's step (the worker side): create the step's execution row from the chain's
state in PostgreSQL, once its turn has come.

The row's id is derived from (chain execution, stage, step), so a duplicate message finds it
taken and does nothing; a step whose input is refused is written `failed` at once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Connection, text

from app.chains import definitions, progress
from app.chains.definitions import Plan, Step
from app.chains.plans import plans, step_execution_id
from app.db import db, driver
from app.executions import entries, gates
from app.executions.spec import VersionSpec, error_body
from app.executions.versions import specs

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
        state = (
            driver(conn)
            .execute(
                _STATE_SQL,
                {
                    "chain_execution_id": chain_execution_id,
                    "id": execution_id,
                    "previous": stage - 1,
                    "needed": needed,
                    "index": index,
                },
            )
            .fetchone()
        )
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
        if not _turn_has_come(plan, stage, previous_done):
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
    progress.reconcile(chain_execution_id, in_canvas=False)
    return StepStart(None)


def _turn_has_come(plan: Plan, stage: int, previous_done: int) -> bool:
    """Every step of the stage before has finished (a compensation: the one it follows)."""
    if stage >= len(plan.stages):
        return stage == len(plan.stages) or previous_done == 1
    return stage == 0 or previous_done == len(plan.stages[stage - 1])


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
    spec = specs.get(conn, version_id)
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
    new = entries.NewStep(
        execution_id=execution_id,
        chain_execution_id=chain_execution_id,
        spec=spec,
        input=payload if isinstance(payload, dict) else {},
        step=step.index,
        stage=stage,
        role="compensate" if stage >= len(plan.stages) else "step",
        error=error,
    )
    hold = None if error or spec.org_id is None else gates.entry(conn, spec.org_id, spec).hold
    if hold is None:
        started = entries.insert_step(conn, new, list(allowed))
        let_out_here = True
    else:
        started, let_out_here = _insert_held_step(conn, replace(new, hold=hold), list(allowed))
    if not started:
        return StepStart(None)
    if error:
        return StepStart(None, settled="failed")
    # A step held back runs later as a plain execution, whose settle moves the chain on.
    return StepStart(execution_id if let_out_here else None)


def _insert_held_step(
    conn: Connection, new: entries.NewStep, allowed: list[str]
) -> tuple[bool, bool]:
    """Insert a step a limit applies to, held, under its organization's flow lock, and release
    what may start: (inserted, let out at once). The others it lets out are published here;
    this step, when let out, runs in its canvas task."""
    org_id = new.spec.org_id
    assert org_id is not None
    with driver(conn).transaction():
        gates.lock(conn, org_id)
        started = entries.insert_step(conn, new, allowed)
        let_out = gates.release(conn, org_id).let_out if started else []
    gates.publish(conn, [out for out in let_out if out.execution_id != new.execution_id])
    return started, any(out.execution_id == new.execution_id for out in let_out)


_JSON_TYPES = {list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}


def _input_error(
    plan: Plan, step: Step, stage: int, spec: VersionSpec, payload: Any
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
    errors = spec.input_errors(payload)
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
        driver(conn)
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
