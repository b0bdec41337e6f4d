"""How a chain execution moves on: a step settled, reconcile the chain with its steps' rows
(finish it, stop it, start its compensations, publish what runs next), resume chains whose
next step never arrived, and cancel.

Whoever records a step's last outcome moves the chain on: inside the canvas the next task is
already on its way; outside it (a retry ran as a plain execution, a message was lost, a cancel
or the sweeper ended a step) the rest of the canvas is published again from the first stage
that has not run (`reconcile`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from app import outbox
from app.audit import services as audit
from app.chains import services
from app.chains.definitions import Plan
from app.chains.launch import publish_from
from app.chains.models import ACTIVE_CHAIN_STATUSES, ChainExecution
from app.chains.plans import plans
from app.config import current_config
from app.db import db, driver
from app.errors import Conflict
from app.executions import cancels, store
from app.executions.spec import TERMINAL_STATUSES, error_body
from app.orgs.services import Principal

log = logging.getLogger(__name__)

FAILED_STATUSES = ("failed", "timed_out", "cancelled")
LIVE_STATUSES = ("queued", "running", "waiting")


# With its chain.succeeded events (app/outbox.py) in the same statement.
_FINISH_FAST_SQL = (
    """
    WITH ended AS (
        UPDATE chain_executions ce
        SET status = 'succeeded', finished_at = now(),
            output = (SELECT output FROM executions WHERE id = %(execution_id)s)
        WHERE ce.id = %(chain_execution_id)s AND ce.status = 'running'
          AND NOT EXISTS (SELECT 1 FROM executions e WHERE e.chain_execution_id = ce.id
                          AND e.chain_role = 'step' AND e.status <> 'succeeded')
        RETURNING ce.id, ce.org_id
    ), notified AS ("""
    + outbox.fanout("ended", org="ended.org_id", event_type="'chain.succeeded'", subject="ended.id")
    + """)
    SELECT count(*) FROM ended
"""
)


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
                ended = (
                    driver(usable)
                    .execute(
                        _FINISH_FAST_SQL,
                        {"chain_execution_id": chain_execution_id, "execution_id": execution_id},
                    )
                    .fetchone()
                )
                if ended is not None and ended[0] == 1:
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
    # A step a rerun reused from the chain execution it reruns: succeeded with no attempt, as
    # no worker ran it here (app/chains/reruns.py).
    reused: bool = False


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
        store.note_cancelled_with_chain(conn, chain_execution_id)
    if ce is None or ce.status not in ACTIVE_CHAIN_STATUSES:
        return False
    chain = _Chain(
        chain_execution_id,
        ce.chain_version_id,
        plans.get(conn, ce.chain_version_id),
        [
            _Row(*row)
            for row in conn.execute(
                text(
                    "SELECT chain_stage, chain_step, chain_role, status, output, error, "
                    "status = 'succeeded' AND attempt = 0 "
                    "FROM executions WHERE chain_execution_id = :id"
                ),
                {"id": chain_execution_id},
            )
        ],
    )
    if ce.status != "compensating":
        return _reconcile_steps(conn, chain, in_canvas, continuations)
    if ce.compensation is None:
        return _compensate(conn, chain, continuations)
    return _reconcile_compensations(conn, chain, ce.compensation, in_canvas, continuations)


@dataclass
class _Chain:
    """A chain execution under reconcile, with its steps' rows."""

    id: uuid.UUID
    version_id: uuid.UUID
    plan: Plan
    rows: list[_Row]

    @property
    def steps(self) -> dict[int, _Row]:
        return {row.step: row for row in self.rows if row.role == "step"}

    @property
    def live(self) -> list[_Row]:
        return [row for row in self.rows if row.status in LIVE_STATUSES]


def _reconcile_steps(
    conn: Connection, chain: _Chain, in_canvas: bool, continuations: list[Continuation]
) -> bool:
    plan, steps = chain.plan, chain.steps
    failed = [row for row in steps.values() if row.status in FAILED_STATUSES]
    if failed and plan.on_failure == "stop":
        first = plan.steps[failed[0].step]
        message = (failed[0].error or {}).get("message", "")
        _update(
            conn,
            chain.id,
            "status = 'compensating', error = :error",
            error={
                "type": "step_failed",
                "message": f"step {first.name!r} {failed[0].status}: {message}",
                "hint": "the step's execution holds its error and logs; later steps were "
                "skipped and the compensations of the steps that succeeded run",
            },
        )
        return _compensate(conn, chain, continuations)
    for number, members in enumerate(plan.stages):  # noqa: B007 - used after the loop
        if not all(i in steps and steps[i].status in TERMINAL_STATUSES for i in members):
            break
    else:
        _finish(conn, chain.id, plan, steps)
        return False
    if any(row.stage == number for row in chain.live):
        return in_canvas  # its other steps are under way
    if in_canvas:
        return True
    skip = frozenset((number, i) for i in plan.stages[number] if i in steps)
    continuations.append(Continuation(chain.version_id, number, skip))
    return False


def _reconcile_compensations(
    conn: Connection,
    chain: _Chain,
    compensation: list[int],
    in_canvas: bool,
    continuations: list[Continuation],
) -> bool:
    plan, last = chain.plan, len(chain.plan.stages)
    done = {row.stage - last: row for row in chain.rows if row.role == "compensate"}
    for position in range(len(compensation)):
        row = done.get(position)
        if row is None or row.status not in TERMINAL_STATUSES:
            break
    else:
        failed = [row for row in done.values() if row.status != "succeeded"]
        _update(
            conn,
            chain.id,
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
    continuations.append(Continuation(chain.version_id, last + position))
    return False


def _compensate(conn: Connection, chain: _Chain, continuations: list[Continuation]) -> bool:
    """Once no step runs any more, fix the compensations (the steps that succeeded, latest
    first) and start them; with none, the chain has failed. A step a rerun reused did its work
    in the chain execution it came from, which owns undoing it: it is not compensated here."""
    plan, steps = chain.plan, chain.steps
    if any(row.role == "step" for row in chain.live):
        return False  # a step still under way: the last one to finish starts them
    order = sorted(
        (
            step.index
            for step in plan.steps
            if step.compensate is not None
            and step.index in steps
            and steps[step.index].status == "succeeded"
            and not steps[step.index].reused
        ),
        key=lambda i: (plan.steps[i].stage, i),
        reverse=True,
    )
    if not order:
        _update(conn, chain.id, "status = 'failed', finished_at = now()")
        return False
    changed = conn.execute(
        text(
            "UPDATE chain_executions SET compensation = CAST(:order AS jsonb) "
            "WHERE id = :id AND compensation IS NULL RETURNING id"
        ),
        {"id": chain.id, "order": _json(order)},
    ).first()
    if changed:
        continuations.append(Continuation(chain.version_id, len(plan.stages)))
    return False


def _json(value: Any) -> str:
    return json.dumps(value)


def _update(conn: Connection, chain_execution_id: uuid.UUID, assignments: str, **params) -> None:
    if "error" in params:
        params["error"] = _json(params["error"])
        assignments = assignments.replace(":error", "CAST(:error AS jsonb)")
    changed = conn.execute(
        text(
            f"UPDATE chain_executions SET {assignments} "
            "WHERE id = :id AND status IN ('queued', 'running', 'compensating')"
        ),
        {"id": chain_execution_id, **params},
    ).rowcount
    if changed and "finished_at" in assignments:
        # Ended here: its chain.succeeded / chain.failed event, in the same transaction
        # (delivered by beat's poll of app/outbox.py's rows).
        outbox.chain_ended(conn, chain_execution_id)


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
            AND (e.status IN ('queued', 'running', 'waiting')
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


def move_on(chain_execution_ids: list[uuid.UUID]) -> None:
    """Let the chains of steps ended outside a worker (a cancel of a queued step, the sweeper)
    move on now, not at the next resume check."""
    for chain_execution_id in dict.fromkeys(chain_execution_ids):
        try:
            reconcile(chain_execution_id, in_canvas=False)
        except Exception:
            # The step's end is recorded; the resume check moves the chain on later.
            log.warning("moving chain execution %s on failed", chain_execution_id, exc_info=True)


# ---------------------------------------------------------------------------------------------
# Cancelling


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
    "SELECT id FROM executions WHERE chain_execution_id = :id "
    "AND status IN ('queued', 'running', 'waiting')"
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
    cancels.request_cancel(conn, org_id, list(live), "cancelled with its chain")


def cancel(session: Session, principal: Principal, chain_execution_id: str) -> ChainExecution:
    """The chain first (no step starts after this), then its running steps."""
    principal.require("executions:cancel")
    execution = services.get_execution(session, principal, chain_execution_id)
    # End the read's transaction first: in a keyed request the session is a savepoint of the
    # request's transaction, and the cancel must not land inside it (the session's close rolls
    # it back, cancel and audit event with it).
    session.commit()
    with db.begin() as conn:
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
        # One event for the request: the steps' cancels below are part of it.
        audit.record(
            conn,
            audit.Actor.of(principal),
            audit.Change(
                "chain_execution.cancel", "chain_execution", execution.id, execution.chain_name
            ),
        )
    for execution_id in live:
        with contextlib.suppress(Conflict):  # it finished meanwhile
            cancels.cancel(
                session,
                principal,
                str(execution_id),
                move_chains_on=move_on,
                reason="cancelled with its chain",
                audited=False,
            )
    session.refresh(execution)
    return execution
