"""Recording how an attempt ended, and moving its chain on: one place for the runner and the
watchdog (which records the end of a python agent that would not stop).

Every write is fenced by the claimed attempt. A chain step's recorded end moves its chain on
(app/chains/progress.py), unless the step runs inside its canvas task (workers/chains.py):
that task moves the chain on itself once the step is settled.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from typing import Any

from app import outbox
from app.chains import progress
from app.db import driver
from app.executions import dispatch, gates, store, waiting
from app.executions.spec import TERMINAL_STATUSES, Claim, VersionSpec, error_body
from workers.runtimes import Outcome

log = logging.getLogger(__name__)


class _InCanvas(threading.local):
    """The step execution this thread runs inside its canvas task, and how it settled."""

    execution_id: uuid.UUID | None = None
    status: str | None = None


in_canvas = _InCanvas()


def record(conn, claimed: Claim, spec: VersionSpec, outcome: Outcome) -> str | None:
    """Write the outcome; the status written ("queued" for a retry), None if fenced out. An
    execution a limit applied to frees its slot in the same transaction, which lets out the
    next one waiting. A retry keeps its slot, except under a rate_limit: each attempt is a
    start, so the retry waits for the window with the others (its backoff does not apply)."""
    events: list[uuid.UUID] = []  # notification events the finish wrote: published once committed
    if claimed.gated:
        status = _freeing_a_slot(
            conn, claimed, lambda: _record(conn, claimed, spec, outcome, events)
        )
    else:
        status = _record(conn, claimed, spec, outcome, events)
    outbox.publish(events)
    if status == "queued" and spec.rate_limit is None:  # committed: published with its backoff
        delay = backoff_seconds(spec.retry, claimed.attempt)
        dispatch.publish(claimed.execution_id, spec, claimed.priority, countdown=delay)
    _wake_parent(conn, claimed, status)
    return status


def _wake_parent(conn, claimed: Claim, status: str | None) -> None:
    """A child's end committed: publish its parent when that end woke it."""
    if claimed.parent_execution_id is not None and status in TERMINAL_STATUSES:
        waiting.publish_parent(conn, claimed.parent_execution_id)


def suspend(conn, claimed: Claim, outcome: Outcome) -> str | None:
    """A durable call made the run wait: the execution waits (or, when what it waits for
    happened meanwhile, is queued again at once); None when fenced out; "cancel" when a cancel
    was asked, for the caller to record instead."""
    return waiting.suspend(conn, claimed, outcome.suspended, outcome.usage)


def _freeing_a_slot(conn, claimed: Claim, write):
    """`write()` under the organization's flow lock, then release what may start; published
    after the commit."""
    assert claimed.org_id is not None
    with driver(conn).transaction():
        gates.lock(conn, claimed.org_id)
        written = write()
        released = gates.release(conn, claimed.org_id) if written else gates.Released()
    gates.publish(conn, released.let_out)
    return written


def _record(
    conn, claimed: Claim, spec: VersionSpec, outcome: Outcome, events: list[uuid.UUID]
) -> str | None:
    if outcome.ok:
        done = store.finish(
            conn,
            claimed,
            status="succeeded",
            output=outcome.output,
            error=None,
            usage=outcome.usage,
        )
        events.extend(done.events)
        return "succeeded" if done else None
    error = error_body(outcome.error_type, outcome.error_message, outcome.hint)
    if outcome.cancelled:
        done = store.finish(
            conn,
            claimed,
            status="cancelled",
            output=None,
            error=error_body("cancelled", outcome.error_message),
            usage=outcome.usage,
        )
        events.extend(done.events)
        return "cancelled" if done else None
    status = "timed_out" if outcome.error_type == "timeout" else "failed"
    if _should_retry(spec, claimed, outcome) and store.requeue_for_retry(
        conn, claimed, attempt_status=status, error=error, usage=outcome.usage
    ):
        return "queued"
    done = store.finish(conn, claimed, status=status, output=None, error=error, usage=outcome.usage)
    events.extend(done.events)
    return status if done else None


def ended(conn, claimed: Claim, status: str, error: dict[str, Any], usage: dict) -> bool:
    """Record an end decided outside the runtime (the watchdog's); False when fenced out."""

    def write() -> store.Finished:
        return store.finish(conn, claimed, status=status, output=None, error=error, usage=usage)

    done = _freeing_a_slot(conn, claimed, write) if claimed.gated else write()
    outbox.publish(done.events)
    _wake_parent(conn, claimed, status if done else None)
    return bool(done)


def move_chain_on(claimed: Claim, status: str) -> None:
    """A chain step's outcome is recorded (`status` is the terminal status written, or
    "queued" when the step was put back for a retry): move its chain on. The chain takes its
    own connection."""
    if claimed.execution_id == in_canvas.execution_id:
        in_canvas.status = status  # the step task moves the chain on itself
        return
    # A retry that ran as a plain execution, or a step the watchdog ended: nothing carries the
    # chain on from here unless this does. (Steps ended outside a worker, by a cancel of a
    # queued step or by the sweeper, move their chain on through progress.move_on.)
    progress.step_settled(
        claimed.chain_execution_id, None, None, claimed.execution_id, status, in_canvas=False
    )


def _should_retry(spec: VersionSpec, claimed: Claim, outcome: Outcome) -> bool:
    # A bad input or output, or a failure the runtime calls final, fails the same way every time.
    if outcome.error_type in ("input_invalid", "output_invalid") or not outcome.retryable:
        return False
    return (
        outcome.error_type in spec.retry.get("retry_on", ()) and claimed.attempt < spec.max_attempts
    )


def backoff_seconds(policy: dict[str, Any], attempt: int) -> float:
    """Exponential backoff from the agent's retry policy, with 'equal jitter' when asked."""
    base = float(policy.get("backoff_seconds", 1))
    ceiling = float(policy.get("backoff_max_seconds", 300))
    delay = min(ceiling, base * 2 ** (attempt - 1))
    if policy.get("jitter", True):
        delay = delay / 2 + random.uniform(0, delay / 2)
    return delay
