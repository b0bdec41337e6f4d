"""One execution, from claim to finish, in a worker's pool process."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded

from app import jsonschemas, storable
from app.config import current_config
from app.db import DATABASE_ERRORS, db
from app.executions import gates, store
from app.executions.spec import Claim, VersionSpec
from app.executions.versions import specs
from app.secrets.crypto import KeyMissing
from app.secrets.services import SecretsMissing
from workers import secret_refs, settle
from workers.agent_state import AgentState
from workers.attempt import AttemptDatabase
from workers.context import AgentLog, Context
from workers.documents import DocumentLoader
from workers.durable import Journal
from workers.lease import lease_keeper
from workers.logbuffer import LogBuffer
from workers.outcomes import outcome_writer
from workers.progress import ProgressReporter
from workers.runtimes import Outcome, Runtime, runtime_for
from workers.wallet_gateway import DatabaseWallet
from workers.watchdog import watchdog

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_SETTLE_PAUSE_SECONDS = 0.5
MAX_SETTLE_PAUSE_SECONDS = 5.0
# How long a finished attempt keeps trying to record its outcome while PostgreSQL is away: a
# restart, a failover or a short network cut, well past the lease. The sweeper extends every
# running lease once the database answers again after an outage (recovery.py), so the row is
# still this attempt's when the outcome comes. Past this the outcome is given up (logged), and
# the lease's expiry reruns or fails the execution. Meanwhile the process's next task waits for
# it before its claim (workers/tasks.py:after_the_last_outcome), for a moment: past it that
# task is retried a second later (Celery's retry: a copy of its message), and the outcome stays
# in flight.
SETTLE_PATIENCE_SECONDS = 600.0


def run_execution(execution_id: uuid.UUID, worker: str, *, inline: bool = False) -> None:
    """Claim, run, and hand the outcome to the process's outcome writer (workers/outcomes.py;
    `inline`: recorded before this returns). The caller waited for the previous outcome."""
    cfg = current_config()
    claimed: Claim | None = None
    ran: tuple[VersionSpec, Outcome, LogBuffer] | None = None
    try:
        with db.hot() as conn:
            claimed, let_out = store.claim(
                conn, execution_id, worker, cfg.lease_seconds, cfg.fair_window
            )
            if let_out:  # the claim made room in the fair window: those held back go out
                gates.publish(conn, let_out)
            if claimed is None:
                log.info(
                    "execution %s is not queued (duplicate or cancelled message): skipped",
                    execution_id,
                )
                return
            lease_keeper.hold(claimed)
            ran = _run_claimed(AttemptDatabase(conn), claimed, cfg)
    finally:
        # Whatever ends the block (a soft time limit lands at any line), a held lease is
        # released, with the outcome recorded first when there is one.
        if claimed is not None:
            try:
                _hand_over(claimed, ran, inline)
            except BaseException:
                lease_keeper.release(claimed)  # a second release of the same claim is a no-op
                raise


def _hand_over(
    claimed: Claim, ran: tuple[VersionSpec, Outcome, LogBuffer] | None, inline: bool
) -> None:
    if ran is None:
        # The attempt broke off (the database away: the task retries, and the lease, no
        # longer renewed, brings the row back).
        lease_keeper.release(claimed)
        return
    spec, outcome, buffer = ran
    lease_keeper.settling(claimed)
    outcome_writer.record(
        lambda: _record(claimed, spec, outcome, buffer),
        then=lambda: lease_keeper.release(claimed),
        inline=inline,
    )


def _run_claimed(
    database: AttemptDatabase, claimed: Claim, cfg
) -> tuple[VersionSpec, Outcome, LogBuffer]:
    """Run the claimed attempt: its spec, its outcome, and its log buffer (with the lines a
    flush could not write, which the outcome's record writes first)."""
    execution_id = claimed.execution_id
    try:
        with database.connection() as conn:
            spec = specs.get(conn, claimed.version_id)
    except DATABASE_ERRORS:
        # The attempt is claimed: a task retry would find the row `running` and drop it.
        spec = _once_the_database_answers(
            database,
            claimed,
            "load its agent version",
            lambda conn: specs.get(conn, claimed.version_id),
        )
    resolved, redactor, unresolved = _with_secrets(database, claimed, spec)
    buffer = LogBuffer(
        database,
        execution_id,
        claimed.attempt,
        claimed.last_seq,
        batch_lines=cfg.log_batch_lines,
        flush_seconds=cfg.log_flush_seconds,
        max_chars=cfg.log_line_max_chars,
        max_lines=spec.limits.get("max_log_lines", cfg.max_log_lines),
        redactor=redactor,
    )
    progress = ProgressReporter(database, claimed, redactor)
    ctx = _context(database, claimed, spec, resolved.config, buffer, progress)
    try:
        if unresolved is not None:
            outcome = unresolved
        else:
            outcome = _run_runtime(claimed, resolved, ctx, buffer)
        if outcome.ok:
            _check_output(spec, outcome, spec.limits.get("max_output_bytes", cfg.max_output_bytes))
        progress.flush()  # a value the throttle held back: no statement when there is none
        buffer.close()
    # Whatever broke around the agent, the claimed row must not stay `running`.
    except SoftTimeLimitExceeded:
        outcome = Outcome(
            error_type="timeout",
            error_message=f"did not finish within timeout_seconds={spec.timeout_seconds}",
        )
    except Exception as exc:
        if isinstance(exc, DATABASE_ERRORS):
            raise  # the task retries; the lease brings the row back if the database lost it
        log.exception("execution %s: the worker failed around the agent", execution_id)
        outcome = Outcome(
            error_type="runtime_error",
            error_message=f"the worker failed while running the agent: {type(exc).__name__}: {exc}",
        )
    if redactor is not None:
        redactor.outcome(outcome)
    return spec, outcome, buffer


def _record(claimed: Claim, spec: VersionSpec, outcome: Outcome, buffer: LogBuffer) -> None:
    """Record the outcome, on a pooled connection of its own (the attempt's went back to the
    pool with the task)."""
    database = AttemptDatabase(None)
    try:
        with database.connection() as conn:
            _settle(conn, claimed, spec, outcome, buffer)
    except DATABASE_ERRORS:
        # The agent's work is done: the sweeper would run it a second time. Keep the outcome
        # (and the log lines not yet written) and write them once the database answers.
        _once_the_database_answers(
            database,
            claimed,
            "record the outcome",
            lambda conn: _settle(conn, claimed, spec, outcome, buffer),
        )


def _context(
    database: AttemptDatabase,
    claimed: Claim,
    spec: VersionSpec,
    config: dict[str, Any],
    buffer: LogBuffer,
    progress: ProgressReporter,
) -> Context:
    """The agent's `ctx`: its log, progress, durable calls, state, documents and wallet."""
    return Context(
        execution_id=claimed.execution_id,
        attempt=claimed.attempt,
        agent={"name": spec.agent_name, "version": spec.version},
        config=config,
        log=AgentLog(buffer),
        check_cancel=CancelCheck(database, claimed.execution_id),
        progress=progress,
        traceparent=claimed.traceparent,
        durable=Journal(database, claimed),
        # The execution's organization: a catalog run keeps its own state, apart from the owner's.
        state=AgentState(database.connection, claimed.org_id, spec.agent_id),
        issue_token=lambda: _issue_token(database, claimed),
        documents=DocumentLoader(database, claimed.execution_id),
        wallet=DatabaseWallet(
            database, claimed.execution_id, claimed.attempt, claimed.org_id, spec.agent_id
        ),
    )


def _with_secrets(
    database: AttemptDatabase, claimed: Claim, spec: VersionSpec
) -> tuple[VersionSpec, secret_refs.Redactor | None, Outcome | None]:
    """The spec the runtime runs (its secret references replaced by their values), the redactor
    of those values, and the outcome to record instead of running when they cannot be had."""
    if not secret_refs.names_of(spec):
        return spec, None, None
    try:
        try:
            with database.connection() as conn:
                resolved, redactor = secret_refs.resolve(conn, spec)
        except DATABASE_ERRORS:
            resolved, redactor = _once_the_database_answers(
                database,
                claimed,
                "read the agent's secrets",
                lambda c: secret_refs.resolve(c, spec),
            )
    except (SecretsMissing, KeyMissing, secret_refs.SecretUnusable) as exc:
        return spec, None, secret_refs.failure(exc)
    return resolved, redactor, None


def _issue_token(database: AttemptDatabase, claimed: Claim) -> str:
    with database.connection() as conn:
        return store.issue_execution_token(conn, claimed)


class CancelCheck:
    """`ctx.cancelled()`'s question to the database. A database that cannot answer counts as
    "not cancelled": the agent goes on, and a cancel asked meanwhile is seen once it answers
    (or by the settle, which asks again before recording a failure)."""

    def __init__(self, database: AttemptDatabase, execution_id: uuid.UUID) -> None:
        self._database = database
        self._execution_id = execution_id
        self._warned = False

    def __call__(self) -> bool:
        if not self._database.worth_trying():
            return False
        try:
            with self._database.connection() as conn:
                return store.cancel_requested(conn, self._execution_id)
        except DATABASE_ERRORS:
            if not self._warned:
                self._warned = True
                log.warning(
                    "execution %s: the database cannot say whether a cancel was asked; "
                    "running on as not cancelled",
                    self._execution_id,
                    exc_info=True,
                )
            return False


def _settle(conn, claimed: Claim, spec: VersionSpec, outcome: Outcome, buffer: LogBuffer) -> None:
    # The log lines a flush could not write go first: a finished execution has its whole log.
    buffer.write_pending(conn)
    if outcome.suspended is not None:
        waited = settle.suspend(conn, claimed, outcome)
        if waited is None:
            log.warning(
                "execution %s attempt %d: its wait was fenced out (the row is no longer this "
                "attempt's)",
                claimed.execution_id,
                claimed.attempt,
            )
        if waited != "cancel":
            return
        # A cancel asked while it ran (seen under the row's lock): it ends instead of waiting.
        outcome = Outcome(
            error_type="cancelled",
            error_message="cancelled while it ran",
            cancelled=True,
            usage=outcome.usage,
        )
    if not outcome.ok and store.cancel_requested(conn, claimed.execution_id):
        # It failed after a cancel was asked (often because of it): report the cancel.
        outcome.cancelled = True
    status = settle.record(conn, claimed, spec, outcome)
    if status is None:
        log.warning(
            "execution %s attempt %d: outcome fenced out: the row is no longer this attempt's "
            "(its lease ran out and the sweeper took it back), or an earlier try wrote the "
            "outcome and lost the answer",
            claimed.execution_id,
            claimed.attempt,
        )
    elif claimed.chain_execution_id is not None:
        settle.move_chain_on(claimed, status)


def _once_the_database_answers(
    database: AttemptDatabase, claimed: Claim, what: str, action: Callable[[Any], T]
) -> T:
    """Do `action(conn)` for a claimed attempt once PostgreSQL answers again (down, restarting,
    a failover), each try on a fresh connection, for up to SETTLE_PATIENCE_SECONDS. The writes
    are fenced by the attempt, so a try that committed but lost its answer makes the next one a
    no-op; the lease is extended by the sweeper's first sweep after the outage."""
    deadline = time.monotonic() + SETTLE_PATIENCE_SECONDS
    pause = FIRST_SETTLE_PAUSE_SECONDS
    while True:
        log.warning(
            "execution %s: the database cannot %s; trying again in %.1fs",
            claimed.execution_id,
            what,
            pause,
        )
        time.sleep(pause)
        try:
            with database.connection() as conn:
                return action(conn)
        except DATABASE_ERRORS:
            if time.monotonic() + pause > deadline:
                raise
        pause = min(pause * 2, MAX_SETTLE_PAUSE_SECONDS)


# runtime type -> its module: runtime_for imports the runtime modules on every call.
_runtimes: dict[str, Runtime] = {}


def _runtime(kind: str) -> Runtime:
    runtime = _runtimes.get(kind)
    if runtime is None:
        runtime = _runtimes[kind] = runtime_for(kind)
    return runtime


def _run_runtime(claimed: Claim, spec: VersionSpec, ctx: Context, buffer: LogBuffer) -> Outcome:
    runtime = _runtime(spec.runtime["type"])
    if spec.runtime["type"] != "python":
        # Child runtimes supervise their own process: timeout, limits and cancel.
        return runtime.run(spec, claimed.input, ctx, buffer)
    with watchdog.watching(claimed, spec, ctx):
        return runtime.run(spec, claimed.input, ctx, buffer)


def _check_output(spec: VersionSpec, outcome: Outcome, max_bytes: int) -> None:
    output = outcome.output
    if not isinstance(output, dict):
        outcome.error_type = "output_invalid"
        outcome.error_message = f"the agent returned {type(output).__name__}, not a JSON object"
        return
    try:
        text = json.dumps(output)
    except (TypeError, ValueError) as exc:
        outcome.error_type = "output_invalid"
        outcome.error_message = f"the output is not JSON: {exc}"
        return
    if len(text) > max_bytes:
        outcome.error_type = "output_too_large"
        outcome.error_message = f"the output is {len(text)} bytes as JSON, over {max_bytes}"
        return
    # On the strings, not on `text`: that escapes valid non-BMP characters as surrogate pairs.
    unstorable = storable.document_problems(output)
    if unstorable:
        # repr: a pointer naming an unstorable key holds that key, and the message is stored too.
        details = "; ".join(
            f"{pointer!r}: {', '.join(msgs)}" for pointer, msgs in unstorable.items()
        )
        outcome.error_type = "output_invalid"
        outcome.error_message = f"the output holds what cannot be stored: {details}"
        return
    errors = jsonschemas.instance_errors(spec.output_validator, output, "")
    if errors:
        details = "; ".join(
            f"{pointer or '/'}: {', '.join(msgs)}" for pointer, msgs in errors.items()
        )
        outcome.error_type = "output_invalid"
        outcome.error_message = f"the output does not match the output_schema: {details}"
