"""Where a pool process records an attempt's outcome: in a thread of its own, so that the process
is handed its next message while the outcome commits.

With prefetch 1, a pool process that returned from a task waits for the worker's main process to
acknowledge the message, take the next one from the broker and pass it over: about 1.5 to 2 ms
on a busy 2-core machine (bench/throughput.py, py-spy). The finish (one UPDATE and its commit,
about 1 ms there) was one more round trip on that same serial path; here it overlaps the
hand-over. bench/throughput.py --batch-size 100 measured Runyard at 430 to 510 executions/s with
the finish inline and 520 to 557/s with it here (plain Celery 700 to 830/s in the same runs).

Acknowledging before the outcome commits loses nothing: once an attempt is claimed, its row and
its lease decide what happens if the process dies, not the message. A redelivered message finds
the row `running` and the claim drops it; a lease no longer renewed is taken back by the sweeper
(a retry, or `lost`), exactly as when the process died during an inline finish. The lease keeps
being renewed until the outcome is recorded (the runner releases it from here).

At most one outcome is in flight per process: the next run or chain-step task waits for it
before its first statement (workers/tasks.py:after_the_last_outcome), so the finish of one
attempt is committed before the next one claims (what frees a concurrency slot or the fair
window stays in order), and the pool process drains it before it exits
(worker_process_shutdown: a warm shutdown, max_tasks_per_child). A chain step records its
outcome inline: its canvas task decides from it whether the canvas goes on. Only prefork pool
processes work this way (`enable()`, from worker_process_init in a pool's child); a solo or
threads pool records outcomes inline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

log = logging.getLogger(__name__)


class OutcomeWriter:
    def __init__(self) -> None:
        self._reset()
        # Threads do not survive a fork: a pool process starts with none and builds its own.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._enabled = False
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def enable(self) -> None:
        self._enabled = True

    def record(
        self, write: Callable[[], None], then: Callable[[], None], *, inline: bool = False
    ) -> None:
        """Run `write` (it records an outcome, and handles the database being away itself),
        then `then`, whatever `write` raised: in the background where enabled, else (or when
        `inline`) now. `then` runs also when the write or the wait before it raises or is
        interrupted (a Celery soft time limit); the runner guards the call itself too."""
        try:
            self.wait()
            if inline or not self._enabled:
                write()
            else:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="runyard-outcome")
                self._pending = self._executor.submit(self._run, write, then)
                return
        except BaseException:
            then()
            raise
        then()

    def wait(self, timeout: float | None = None) -> bool:
        """Until the outcome in flight, if any, is recorded (or given up: see _run), for up to
        `timeout` seconds; whether none is in flight now. Kept in flight if the wait times out
        or is interrupted: the next wait (the process's exit) waits again."""
        pending = self._pending
        if pending is None:
            return True
        try:
            pending.result(timeout)
        except FutureTimeout:
            return False
        if self._pending is pending:
            self._pending = None
        return True

    @staticmethod
    def _run(write: Callable[[], None], then: Callable[[], None]) -> None:
        try:
            write()
        except Exception:
            # Inline, this failed the Celery task and was logged there. The row is still the
            # attempt's, `running`: its lease, no longer renewed, brings it back to the sweeper.
            log.exception("an outcome could not be recorded; the execution's lease will expire")
        finally:
            then()


outcome_writer = OutcomeWriter()
