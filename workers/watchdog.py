"""Cancel and the hard timeout for `python` agents, which run inside the pool process itself.

Nothing can stop such an agent short of its own process, so one watchdog thread per pool process
looks after the agent running there:
- every CANCEL_CHECK_SECONDS it asks the database whether a cancel was requested; from then on
  `ctx.cancelled()` is true at once;
- RUNYARD_PYTHON_CANCEL_GRACE_SECONDS later (or at the hard timeout) it raises
  SoftTimeLimitExceeded in the agent, through billiard's SIGUSR1 handler;
- if the agent swallows that and is still running LAST_RESORT_SECONDS later, the watchdog records
  the outcome itself (fenced by the attempt, like any finish) and kills its own process. Billiard
  starts a fresh one, and the message, given back by `task_reject_on_worker_lost`, finds the row
  finished and is dropped.

Executions that end within WATCH_AFTER_SECONDS are never looked at, so the hot path pays nothing
but an attribute write.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from resource import RUSAGE_SELF

from app.config import current_config
from app.db import db
from app.executions import store
from app.executions.spec import HARD_LIMIT_GRACE_SECONDS, Claim, VersionSpec, error_body
from workers import settle
from workers.context import Context

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25
WATCH_AFTER_SECONDS = 0.5
CANCEL_CHECK_SECONDS = 0.5
LAST_RESORT_SECONDS = 3.0


@dataclass
class Watch:
    claimed: Claim
    spec: VersionSpec
    ctx: Context
    started: float
    rusage_at_start: resource.struct_rusage
    cancel_seen_at: float | None = None
    interrupted_at: float | None = None
    next_check: float = 0.0

    def usage(self) -> dict[str, float]:
        """What the agent used until now, as the python runtime reports it."""
        before, after = self.rusage_at_start, resource.getrusage(RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return {
            "cpu_seconds": round(cpu, 4),
            "max_rss_mb": round(after.ru_maxrss / 1024, 1),
            "wall_ms": round((time.monotonic() - self.started) * 1000),
        }

    @property
    def hard_deadline(self) -> float:
        # Before Celery's own hard limit, so the row says `timed_out` rather than `lost`.
        return self.started + self.spec.timeout_seconds + HARD_LIMIT_GRACE_SECONDS / 2


class Watchdog:
    def __init__(self) -> None:
        self._watch: Watch | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        # Held by the watchdog while it signals or records, and taken by the main thread on its
        # way out of `watching`: no interruption or kill can land after the agent returned.
        self._lock = threading.Lock()

    @contextmanager
    def watching(self, claimed: Claim, spec: VersionSpec, ctx: Context) -> Iterator[Watch]:
        if self._thread is None or self._pid != os.getpid():
            # Threads do not survive a fork: each pool process starts its own, once.
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="runyard-watchdog", daemon=True)
            self._thread.start()
        watch = Watch(claimed, spec, ctx, time.monotonic(), resource.getrusage(RUSAGE_SELF))
        self._watch = watch
        try:
            yield watch
        finally:
            # Cleared first (an atomic write) so the watchdog's next look sees it; then wait
            # out an interruption being sent right now. If one is, SoftTimeLimitExceeded is
            # raised here, still inside the runner's handler for it.
            self._watch = None
            with self._lock:
                pass

    def _run(self) -> None:
        while True:
            time.sleep(POLL_SECONDS)
            watch = self._watch
            if watch is None or time.monotonic() - watch.started < WATCH_AFTER_SECONDS:
                continue
            try:
                self._look(watch)
            except Exception:
                # The database may be away for a moment; the next round asks again.
                log.warning("watchdog: check of %s failed", watch.claimed.execution_id, exc_info=1)

    def _look(self, watch: Watch) -> None:
        # Lines and progress of an agent that went quiet do not wait for its next call.
        watch.ctx.flush_if_due()
        now = time.monotonic()
        if watch.cancel_seen_at is None and now >= watch.next_check:
            watch.next_check = now + CANCEL_CHECK_SECONDS
            with db.hot() as conn:
                if store.cancel_requested(conn, watch.claimed.execution_id):
                    watch.cancel_seen_at = now
                    watch.ctx.mark_cancelled()
        grace = current_config().python_cancel_grace_seconds
        due = (
            watch.cancel_seen_at is not None and now >= watch.cancel_seen_at + grace
        ) or now >= watch.hard_deadline
        if not due:
            return
        with self._lock:
            if self._watch is not watch:
                return  # the agent returned meanwhile
            if watch.interrupted_at is None:
                watch.interrupted_at = now
                _interrupt()
            elif now >= watch.interrupted_at + LAST_RESORT_SECONDS:
                self._give_up(watch)

    def _give_up(self, watch: Watch) -> None:
        """Record the outcome and kill this process (under the lock, the agent still running)."""
        if watch.cancel_seen_at is not None:
            status, error = (
                "cancelled",
                error_body(
                    "cancelled", "the agent did not stop after the cancel; its process was killed"
                ),
            )
        else:
            status, error = (
                "timed_out",
                error_body(
                    "timeout",
                    f"ran past timeout_seconds={watch.spec.timeout_seconds} and ignored the soft "
                    "limit; its process was killed",
                ),
            )
        with db.hot() as conn:
            recorded = settle.ended(conn, watch.claimed, status, error, watch.usage())
        if recorded and watch.claimed.chain_execution_id is not None:
            _move_chain_on(watch, status)
        if not recorded:
            # The sweeper took the attempt back meanwhile: the row is not ours to end, and
            # the process is left alone.
            self._watch = None
            return
        log.warning("watchdog: killing pool process %s (%s)", os.getpid(), status)
        os.kill(os.getpid(), signal.SIGKILL)


def _move_chain_on(watch: Watch, status: str) -> None:
    """The chain moves on now rather than at its next resume check; if that fails, the resume
    check still will, and the kill that follows must happen regardless."""
    try:
        settle.move_chain_on(watch.claimed, status)
    except Exception:
        log.warning(
            "watchdog: moving chain %s on failed", watch.claimed.chain_execution_id, exc_info=1
        )


def _interrupt() -> None:
    """SoftTimeLimitExceeded in the agent, through the handler billiard installs in each pool
    process. Without that handler (another pool), SIGUSR1 would kill the process outright."""
    if callable(signal.getsignal(signal.SIGUSR1)):
        os.kill(os.getpid(), signal.SIGUSR1)


watchdog = Watchdog()
