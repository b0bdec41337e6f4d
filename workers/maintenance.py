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
- the statistics tally (app/stats/tally.py), every STATS_TALLY_SECONDS: finished executions into
  the rollups of GET /agents/{ref}/stats and the totals of /metrics, submits, schedule lag; and
  the pruning of rollups past the longest stats window, hourly.

Two beats may run at once: the sweep takes a lock in the broker's Redis, the resume check marks
the chains it looked at, and pruning twice deletes nothing twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.chains import progress
from app.config import current_config
from app.executions import gates, recovery
from app.idempotency import services as idempotency
from app.stats import tally

log = logging.getLogger(__name__)

IDEMPOTENCY_PRUNE_SECONDS = 600.0
# Also how late a rate-limited execution may start once its window has room.
FLOW_TICK_SECONDS = 0.25
STATS_TALLY_SECONDS = 5.0
STATS_PRUNE_SECONDS = 3600.0


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


def _prune_idempotency_keys() -> None:
    deleted = idempotency.prune()
    if deleted:
        log.info("idempotency: deleted %d expired keys", deleted)


def _tally_stats() -> None:
    report = tally.tally()
    if not report.caught_up:
        log.info("stats: tally behind, counted %s this round", report)


def _prune_stats() -> None:
    deleted = tally.prune()
    if deleted:
        log.info("stats: deleted %d rollups past the longest window", deleted)


def default_jobs() -> list[Job]:
    interval = current_config().sweep_interval_seconds
    return [
        Job("sweep", interval, _sweep),
        Job("chains-resume", interval, _resume_chains),
        Job("flow-tick", FLOW_TICK_SECONDS, _flow_tick),
        Job("idempotency-prune", IDEMPOTENCY_PRUNE_SECONDS, _prune_idempotency_keys),
        Job("stats-tally", STATS_TALLY_SECONDS, _tally_stats),
        Job("stats-prune", STATS_PRUNE_SECONDS, _prune_stats),
    ]


class Maintenance:
    """Runs each job when it is due, one after another, in one daemon thread."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="runyard-maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("maintenance in beat: %s", ", ".join(job.name for job in self.jobs))

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
