"""Thin tasks: they take ids and call the services."""

from __future__ import annotations

import uuid

from billiard.process import current_process
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown

from app.broker import NOTIFY_TASK, RUN_TASK
from app.config import current_config
from app.db import db
from workers import app, notify
from workers.outcomes import outcome_writer
from workers.runner import DATABASE_ERRORS
from workers.runner import run_execution as run

# How long a task waits for the outcome its process still records before it retries instead.
OUTCOME_WAIT_SECONDS = 0.25


class DatabaseTask(Task):
    """Makes sure the process has its database configured; engines are per process."""

    abstract = True

    def before_start(self, task_id, args, kwargs):
        if not db.configured:
            db.configure(current_config().require_database())


@worker_process_init.connect
def _fresh_engine_after_fork(**_kwargs) -> None:
    # A forked pool process must not share the parent's sockets.
    db.dispose()
    db.configure(current_config().require_database())
    # A prefork pool's child only: a solo pool sends this signal in the worker's own process,
    # and never worker_process_shutdown, which drains the writer.
    if current_process().name != "MainProcess":
        outcome_writer.enable()


def after_the_last_outcome(task: Task) -> None:
    """Before a task's first statement: the outcome this process still records is committed
    (workers/outcomes.py), usually within a millisecond. The task's time limits count from its
    start, and are its agent's timeout: one that would wait longer than
    OUTCOME_WAIT_SECONDS (the database slow or away), or whose soft limit runs out meanwhile,
    is retried instead, nothing claimed (its message acknowledged and a copy published, as
    Celery's retries do), and its agent starts later with its whole timeout."""
    try:
        if outcome_writer.wait(OUTCOME_WAIT_SECONDS):
            return
    except SoftTimeLimitExceeded:
        pass
    raise task.retry(countdown=min(1 + task.request.retries, 30))


@worker_process_shutdown.connect
def _last_outcome_before_exit(**_kwargs) -> None:
    # A warm shutdown or max_tasks_per_child: the outcome in flight commits before the exit.
    outcome_writer.wait()


@app.task(
    name=RUN_TASK,
    base=DatabaseTask,
    bind=True,
    # The database was unreachable (or a pooled connection had died): try again shortly. The
    # claim makes a retry after a successful claim harmless; the sweeper covers the rest.
    autoretry_for=DATABASE_ERRORS,
    retry_backoff=1,
    retry_backoff_max=30,
    # For as long as the database is away: the message is the only thing that knows this
    # execution still has to run once the row can be claimed.
    max_retries=None,
)
def run_execution(self, execution_id: str) -> None:
    after_the_last_outcome(self)
    run(uuid.UUID(execution_id), worker=self.request.hostname or "worker")


@app.task(name=NOTIFY_TASK, base=DatabaseTask)
def deliver_notifications(event_ids: list[str]) -> None:
    # No retry of its own: an event this run could not take stays due, for beat's poll.
    notify.deliver([uuid.UUID(event_id) for event_id in event_ids])
