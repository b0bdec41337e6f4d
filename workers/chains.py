"""Thin tasks of chains: one step of a chain's canvas, and the resumption check beat runs.

A step task starts the step's execution (app/chains/services.py decides whether its turn has
come), runs it through the runner's own claim -> run -> record, and then lets the canvas carry
on only when the chain should go on from here. When the step is put back for a retry, the
retry runs as a plain execution and the runner's settled hook moves the chain on when it ends.
"""

from __future__ import annotations

import threading
import uuid

from app.chains import services
from app.executions.services import Claim
from workers import app
from workers.runner import DATABASE_ERRORS, run_execution, settled_hooks
from workers.tasks import DatabaseTask


class _InCanvas(threading.local):
    """The step execution this thread runs inside its canvas task, and how it settled."""

    execution_id: uuid.UUID | None = None
    status: str | None = None


_in_canvas = _InCanvas()


def _on_settled(_conn, claimed: Claim, status: str) -> None:
    """The runner's (and the watchdog's) hook; the chain takes its own connection."""
    if claimed.execution_id == _in_canvas.execution_id:
        _in_canvas.status = status  # the step task moves the chain on itself
        return
    # A retry that ran as a plain execution, or a step the watchdog ended: nothing carries the
    # chain on from here unless this does. (Steps ended outside a worker, by a cancel of a
    # queued step or by the sweeper, move their chain on in app/executions/services.py.)
    services.step_settled(
        claimed.chain_execution_id, None, None, claimed.execution_id, status, in_canvas=False
    )


settled_hooks.append(_on_settled)


@app.task(
    name=services.STEP_TASK,
    base=DatabaseTask,
    bind=True,
    autoretry_for=DATABASE_ERRORS,
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=None,
)
def run_step(self, chain_execution_id: str, chain_version_id: str, stage: int, index: int) -> None:
    chain_execution = uuid.UUID(chain_execution_id)
    chain_version = uuid.UUID(chain_version_id)
    start = services.start_step(chain_execution, chain_version, stage, index)
    status = start.settled
    if start.execution_id is not None:
        _in_canvas.execution_id, _in_canvas.status = start.execution_id, None
        try:
            run_execution(start.execution_id, worker=self.request.hostname or "worker")
        finally:
            status, _in_canvas.execution_id = _in_canvas.status, None
    proceed = False
    if status is not None:
        proceed = services.step_settled(
            chain_execution,
            chain_version,
            stage,
            services.step_execution_id(chain_execution, stage, index),
            status,
            in_canvas=True,
        )
    if not proceed:
        # The chain does not go on from this task (it ended, it is retrying this step, or
        # another task holds the step): drop the rest of the canvas this message carries.
        self.request.chain = None
        self.request.callbacks = None
