"""The thin task of chains: one step of a chain's canvas.

A step task starts the step's execution (app/chains/steps.py decides whether its turn has
come), runs it through the runner's own claim -> run -> record, and then lets the canvas carry
on only when the chain should go on from here. When the step is put back for a retry, the
retry runs as a plain execution and its settle (workers/settle.py) moves the chain on when it
ends.
"""

from __future__ import annotations

import uuid

from app.broker import STEP_TASK
from app.chains import progress, steps
from app.chains.plans import step_execution_id
from workers import app
from workers.runner import DATABASE_ERRORS, run_execution
from workers.settle import in_canvas
from workers.tasks import DatabaseTask, after_the_last_outcome


@app.task(
    name=STEP_TASK,
    base=DatabaseTask,
    bind=True,
    autoretry_for=DATABASE_ERRORS,
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=None,
)
def run_step(self, chain_execution_id: str, chain_version_id: str, stage: int, index: int) -> None:
    after_the_last_outcome(self)
    chain_execution = uuid.UUID(chain_execution_id)
    chain_version = uuid.UUID(chain_version_id)
    start = steps.start_step(chain_execution, chain_version, stage, index)
    status = start.settled
    if start.execution_id is not None:
        in_canvas.execution_id, in_canvas.status = start.execution_id, None
        try:
            # Inline: this task moves the canvas on from the outcome (in_canvas), and the next
            # step's task must find it committed.
            run_execution(start.execution_id, worker=self.request.hostname or "worker", inline=True)
        finally:
            status, in_canvas.execution_id = in_canvas.status, None
    proceed = False
    if status is not None:
        proceed = progress.step_settled(
            chain_execution,
            chain_version,
            stage,
            step_execution_id(chain_execution, stage, index),
            status,
            in_canvas=True,
        )
    if not proceed:
        # The chain does not go on from this task (it ended, it is retrying this step, or
        # another task holds the step): drop the rest of the canvas this message carries.
        self.request.chain = None
        self.request.callbacks = None
