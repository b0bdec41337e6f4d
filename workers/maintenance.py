"""Recovery and housekeeping, run by beat itself rather than sent to the workers as tasks.

A sweep sent as a message would wait behind the work it exists to rescue: with every process
serving `default` busy on long executions, it expires unrun, and a dead worker's execution, a
broker that lost its data or a stalled chain waits with it. So beat (DatabaseScheduler) runs
these jobs in a thread of its own, at their own pace, whatever the workers are doing:

- the sweeper (app/executions/recovery.py), every RUNYARD_SWEEP_INTERVAL_SECONDS;
- the chains' resume check (app/chains/services.py), at the same pace;
- the flow tick (app/executions/gates.py: flow_tick), every FLOW_TICK_SECONDS: executions
  held back for a rate-limit window that moved on, for a slot freed where no release ran (a
  lease the sweeper ended, a crash), or for a fair window a crash left with room;
- the pruning of idempotency keys past their 24 hours, every ten minutes (expired keys already
  count as absent: this only keeps the table small);
- in a thread of its own (`notification_jobs`), so a slow receiver never holds up the sweeper:
  the delivery of due notification events (workers/notify.py), every
  RUNYARD_NOTIFY_POLL_SECONDS. The task a writer publishes after its commit usually delivers
  first; this is what makes a lost message only a delay;
- in a third thread (`housekeeping_jobs`), so that seconds of work never hold back the flow
  tick: retention, every RUNYARD_RETENTION_INTERVAL_SECONDS (finished executions and chain
  executions past their organization's retention_days, else RUNYARD_RETENTION_DAYS, with their
  attempts and log lines, and notification events delivered or failed as long ago,
  RUNYARD_RETENTION_BATCH rows a transaction, for at most RETENTION_BUDGET_SECONDS a run); the
  statistics tally (app/stats/tally.py), every STATS_TALLY_SECONDS: finished executions into the
  rollups of GET /agents/{ref}/stats and the totals of /metrics, submits, schedule lag; and the
  pruning of rollups past the longest stats window, hourly; events (app/events/services.py),
  every EVENT_HOUSEKEEPING_SECONDS: the dedupe keys of events past 24 hours cleared, events
  past RUNYARD_EVENT_RETENTION_DAYS deleted; and the audit trail's sealer
  (app/audit/services.py), every AUDIT_SEAL_SECONDS: committed events numbered and chained.

Two beats may run at once: the sweep takes a lock in the broker's Redis, the resume check marks
the chains it looked at, pruning twice deletes nothing twice (retention skips the rows the other
holds locked), and deliveries claim their events with SKIP LOCKED.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.audit import services as audit
from app.chains import progress
from app.chains import retention as chain_retention
from app.config import current_config
from app.db import db
from app.events import services as events
from app.executions import cancels, gates, recovery, store, waiting
from app.idempotency import services as idempotency
from app.notifications import delivery
from app.stats import tally
from workers import notify

log = logging.getLogger(__name__)

IDEMPOTENCY_PRUNE_SECONDS = 600.0
# Also how late a rate-limited execution may start once its window has room.
FLOW_TICK_SECONDS = 0.25
RETENTION_BUDGET_SECONDS = 10.0
# Event ids free again once 24 hours old (the accept path frees a conflicting one itself: this
# only keeps the unique index small) and events past RUNYARD_EVENT_RETENTION_DAYS.
EVENT_HOUSEKEEPING_SECONDS = 600.0
STATS_TALLY_SECONDS = 5.0
STATS_PRUNE_SECONDS = 3600.0
# Committed audit events get their seq and hash within about this long (readers seal first).
AUDIT_SEAL_SECONDS = 1.0
# A durable sleep or event timeout resumes within about this long of its due time.
DURABLE_TICK_SECONDS = 0.5


@dataclass
class Job:
    name: str
    every_seconds: float
    run: Callable[[], None]
    due_at: float = 0.0


# What the sweeper's ended steps and a broker reset mean for chains: executions know none.
CHAIN_HOOKS = recovery.ChainHooks(move_on=progress.move_on, resume_stalled=progress.resume_stalled)


def sweep(budget_seconds: float | None = None) -> recovery.SweepReport:
    """One sweep of the executions, with the chains of the steps it ended moved on."""
    return recovery.sweep(budget_seconds, chains=CHAIN_HOOKS)


def _sweep() -> None:
    report = sweep()
    if report.republished or report.requeued or report.lost or report.restored:
        log.warning("sweeper: %s", report)


def _resume_chains() -> None:
    resumed = len(progress.resume_stalled())
    if resumed:
        log.warning("chains: resumed %d stalled chain executions", resumed)


def _flow_tick() -> None:
    let_out = gates.flow_tick()
    if let_out:
        log.debug("flow: let out %d held executions", let_out)


def _durable_tick() -> None:
    """Wake the durable executions whose sleep or event wait is due, and finish cancel
    cascades cut short."""
    with db.hot() as conn:
        woken = waiting.wake_due(conn)
    if woken:
        log.debug("durable: woke %d waiting executions", len(woken))
    orphans = cancels.cancel_orphans()
    if orphans:
        log.warning("durable: cancelled %d children of cancelled parents", orphans)


def _prune_idempotency_keys() -> None:
    deleted = idempotency.prune()
    if deleted:
        log.info("idempotency: deleted %d expired keys", deleted)


def apply_retention(
    budget_seconds: float = RETENTION_BUDGET_SECONDS, batch: int | None = None
) -> int:
    """Delete expired chain executions, then executions, then notification events that ended,
    a batch per transaction (each holds its row locks for one batch only), until none is left
    or the budget is spent; how many rows went (chain executions count one each, not their
    steps)."""
    cfg = current_config()
    batch = batch or cfg.retention_batch
    deadline = time.monotonic() + budget_seconds
    deleted = 0
    for delete_batch in (
        chain_retention.delete_expired,
        store.delete_expired,
        delivery.delete_expired,
    ):
        while time.monotonic() < deadline:
            with db.begin() as conn:
                count = delete_batch(conn, cfg.retention_days, batch)
            deleted += count
            if count < batch:
                break
    return deleted


def _retention() -> None:
    deleted = apply_retention()
    if deleted:
        log.info("retention: deleted %d finished executions and chain executions", deleted)


def event_housekeeping(
    budget_seconds: float = RETENTION_BUDGET_SECONDS, batch: int | None = None
) -> tuple[int, int]:
    """Free the ids of events past their 24 hours of deduplication, then delete events past
    RUNYARD_EVENT_RETENTION_DAYS, a batch per transaction, within the budget: (freed, deleted)."""
    cfg = current_config()
    batch = batch or cfg.retention_batch
    deadline = time.monotonic() + budget_seconds
    totals = [0, 0]
    steps = (
        lambda conn: events.release_dedupe_keys(conn, batch),
        lambda conn: events.delete_expired(conn, cfg.event_retention_days, batch),
    )
    for index, step in enumerate(steps):
        while time.monotonic() < deadline:
            with db.begin() as conn:
                count = step(conn)
            totals[index] += count
            if count < batch:
                break
    return totals[0], totals[1]


def _event_housekeeping() -> None:
    freed, deleted = event_housekeeping()
    if freed or deleted:
        log.info("events: freed %d ids past 24 hours, deleted %d past retention", freed, deleted)


def _tally_stats() -> None:
    report = tally.tally()
    if not report.caught_up:
        log.info("stats: tally behind, counted %s this round", report)


def _seal_audit() -> None:
    with db.begin() as conn:
        sealed = audit.seal_all(conn)
    if sealed:
        log.debug("audit: sealed %d events", sealed)


def _prune_stats() -> None:
    deleted = tally.prune()
    if deleted:
        log.info("stats: deleted %d rollups past the longest window", deleted)


def default_jobs() -> list[Job]:
    cfg = current_config()
    interval = cfg.sweep_interval_seconds
    return [
        Job("sweep", interval, _sweep),
        Job("chains-resume", interval, _resume_chains),
        Job("flow-tick", FLOW_TICK_SECONDS, _flow_tick),
        Job("durable-tick", DURABLE_TICK_SECONDS, _durable_tick),
        Job("idempotency-prune", IDEMPOTENCY_PRUNE_SECONDS, _prune_idempotency_keys),
    ]


def housekeeping_jobs() -> list[Job]:
    """The slow jobs, in a thread of their own: a retention run (up to RETENTION_BUDGET_SECONDS)
    or a tally catching up must not hold back the flow tick and the sweep by seconds."""
    return [
        Job("retention", current_config().retention_interval_seconds, _retention),
        Job("stats-tally", STATS_TALLY_SECONDS, _tally_stats),
        Job("stats-prune", STATS_PRUNE_SECONDS, _prune_stats),
        Job("audit-seal", AUDIT_SEAL_SECONDS, _seal_audit),
        Job("events", EVENT_HOUSEKEEPING_SECONDS, _event_housekeeping),
    ]


def _deliver_notifications() -> None:
    delivered = notify.deliver_due()
    if delivered:
        log.debug("notifications: %d deliveries attempted", delivered)


def notification_jobs() -> list[Job]:
    return [Job("notifications", current_config().notify_poll_seconds, _deliver_notifications)]


class Maintenance:
    """Runs each job when it is due, one after another, in one daemon thread."""

    def __init__(self, jobs: list[Job], name: str = "runyard-maintenance") -> None:
        self.jobs = jobs
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("%s in beat: %s", self._thread.name, ", ".join(job.name for job in self.jobs))

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopped.is_set():
            for job in self.jobs:
                if self._stopped.is_set() or time.monotonic() < job.due_at:
                    continue
                try:
                    job.run()
                except Exception:
                    # PostgreSQL or the broker may be away: the next round tries again.
                    log.exception("maintenance job %s failed", job.name)
                job.due_at = time.monotonic() + job.every_seconds
            next_due = min(job.due_at for job in self.jobs)
            self._stopped.wait(max(0.0, next_due - time.monotonic()))
