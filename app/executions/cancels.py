"""Cancels: a queued or waiting execution ends at once, a running one is asked to stop, and
an execution's unfinished children go with it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from app.audit import services as audit
from app.db import db, driver
from app.errors import Conflict
from app.executions import gates, store, waiting
from app.executions.models import Execution
from app.executions.services import get, parse_id
from app.orgs.services import Principal

# Called with the chain executions of steps that a cancel ended before any worker ran them: no
# worker records their end, so the caller (the layer that knows chains) moves those chains on.
ChainsMoveOn = Callable[[list[uuid.UUID]], None]


def cancel(
    session: Session,
    principal: Principal,
    execution_id: str,
    *,
    move_chains_on: ChainsMoveOn,
    reason: str = "cancelled before it started",
    audited: bool = True,
) -> Execution:
    """Cancel is a row change, so it holds across restarts: a queued execution's claim then
    finds nothing to take (the message is dropped), and a running one's worker sees the request
    within CANCEL_CHECK_SECONDS and stops it (workers/runtimes/child.py, workers/watchdog.py).

    No Celery revoke is sent: it would add nothing the claim does not already guarantee, and
    its broadcast retries without bound while the broker is away, which would hang the cancel.
    `audited`: False when the cancel is part of another audited change (its chain's cancel)."""
    principal.require("executions:cancel")
    with db.begin() as conn:
        # The organization's flow lock first, as a finish takes it: the cancel's row lock (and
        # a child's parent's, through the journal trigger) come after it, never before.
        gates.lock(conn, principal.org_id)
        done = store.cancel(conn, principal.org_id, parse_id(execution_id), reason)
        if done is not None and audited:
            audit.record(
                conn,
                audit.Actor.of(principal),
                audit.Change("execution.cancel", "execution", done.id, done.agent_name),
            )
        if done is not None and done.ended and done.gated:
            # It may have been let out to run: its slot goes to the next one waiting.
            released = gates.released_in_transaction(conn, principal.org_id)
            gates.publish_after_commit(released.let_out)
    if done is not None and done.ended and done.chain_execution_id is not None:
        # No worker records this step's end: its chain moves on from here. (A running step's
        # worker records the cancel and moves the chain on itself.)
        move_chains_on([done.chain_execution_id])
    if done is not None:
        _wake_parent(done)
        move_chains_on(cancel_descendants(principal.org_id, [done.id]))
    execution = get(session, principal, execution_id)
    if done is None:
        raise Conflict(
            f"execution {execution.id} has finished ({execution.status}); nothing to cancel",
            hint=f"GET /api/v1/executions/{execution.id} shows how it ended",
        )
    session.refresh(execution)
    return execution


def cancel_descendants(org_id: uuid.UUID, parent_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """Cancel the unfinished children (and theirs) of cancelled executions, each in a
    transaction of its own after the parent's committed: a child's end locks its parent's row
    (the journal trigger), so ending them in the parent's transaction could deadlock with a
    child's worker. The sweeper finishes a cascade cut short (`cancel_orphans`). Returns the
    chain executions of chain steps that ended here, for the caller to move on."""
    with db.hot() as conn:
        children = waiting.unfinished_descendants(conn, parent_ids)
    return _cancel_each([(child_id, org_id) for child_id in children])


def _wake_parent(done: Any) -> None:
    """A child that ended here may have woken its waiting parent (the journal trigger queued
    it unpublished): publish it now rather than at the sweeper's next look."""
    if done.ended and done.parent_execution_id is not None:
        with db.hot() as conn:
            waiting.publish_parent(conn, done.parent_execution_id)


def cancel_orphans() -> int:
    """Beat: cancel the unfinished children of cancelled parents that a cascade missed (the
    API process stopped halfway through); how many."""
    with db.hot() as conn:
        orphans = waiting.orphans_of_cancelled(conn)
    _cancel_each([(row[0], row[1]) for row in orphans])
    return len(orphans)


def _cancel_each(executions: list[tuple[uuid.UUID, uuid.UUID]]) -> list[uuid.UUID]:
    chains: list[uuid.UUID] = []
    for execution_id, org_id in executions:
        with db.hot() as conn:
            released = gates.Released()
            with driver(conn).transaction():
                gates.lock(conn, org_id)  # before the rows, as in `cancel`
                done = store.cancel(conn, org_id, execution_id, "cancelled with its parent")
                if done is not None and done.ended and done.gated:
                    released = gates.release(conn, org_id)
            gates.publish(conn, released.let_out)
        if done is not None:
            _wake_parent(done)
        if done is not None and done.ended and done.chain_execution_id is not None:
            chains.append(done.chain_execution_id)
    return chains


def request_cancel(
    conn: Connection, org_id: uuid.UUID, execution_ids: list[uuid.UUID], message: str
) -> None:
    """Cancel from inside a caller's transaction (a schedule's overlap policy cancel_other):
    the same row changes as `cancel`, for executions that have not finished."""
    for execution_id in execution_ids:
        store.cancel(conn, org_id, execution_id, message)
