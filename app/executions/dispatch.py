"""Publishing committed executions to the broker, and stamping them `dispatched_at`.

A row is always committed before its message is sent: a worker never sees an id the database
lacks. A publish that fails loses nothing: the row stays unstamped and the sweeper publishes it
after RUNYARD_DISPATCH_GRACE_SECONDS.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

from app import broker
from app.db import db
from app.executions import entries
from app.executions.spec import VersionSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dispatch:
    execution_id: uuid.UUID
    spec: VersionSpec
    priority: int

    def message(self) -> broker.RunMessage:
        return broker.RunMessage(
            self.execution_id,
            self.spec.queue,
            self.priority,
            self.spec.soft_time_limit,
            self.spec.time_limit,
            self.spec.agent_name,
            self.spec.version,
            self.spec.org_label,
        )


def stamp_dispatched(execution_ids: list[uuid.UUID]) -> None:
    """Mark published rows, so the sweeper does not publish them again (a caller that stamps
    later than it publishes, as the Dispatcher does)."""
    if execution_ids:
        with db.hot() as conn:
            entries.stamp_dispatched(conn, execution_ids)


def publish(
    execution_id: uuid.UUID, spec: VersionSpec, priority: int, countdown: float | None = None
) -> bool:
    """Send one message now and stamp it (sweeper and retries); on a broker outage leave it to
    the sweeper: the row is safe."""
    try:
        broker.send_run(Dispatch(execution_id, spec, priority).message(), countdown=countdown)
    except Exception:  # a broker outage must not lose the committed row, only delay it
        log.warning(
            "publish of execution %s failed; the sweeper will retry", execution_id, exc_info=True
        )
        return False
    stamp_dispatched([execution_id])
    return True


def publish_many(batch: list[Dispatch]) -> list[uuid.UUID]:
    """Publish messages in bulk (broker.send_runs_in_bulk: the task message built once per
    queue, priority and time limits, one LPUSH per group on Redis); the ids sent, or none on a
    broker outage (the rows stay unstamped and the sweeper tries again)."""
    if not batch:
        return []
    try:
        broker.send_runs_in_bulk([item.message() for item in batch])
    except Exception:  # a broker outage: the sweeper publishes these rows later
        log.warning(
            "publishing %d executions failed; the sweeper will retry", len(batch), exc_info=True
        )
        return []
    return [item.execution_id for item in batch]


def publish_committed(batch: list[Dispatch]) -> list[uuid.UUID]:
    """Publish committed rows now, in bulk, and stamp them; on a broker outage nothing is
    stamped and the sweeper publishes them later."""
    sent = publish_many(batch)
    stamp_dispatched(sent)
    return sent


class Dispatcher:
    """Publishes submitted executions from a background thread, in batches, and stamps
    `dispatched_at` once they are out.

    A submit answers as soon as its row is committed, without waiting on the broker. Batches
    grow by themselves under load (while one is published the next accumulates) and each goes
    to Redis as one pipeline. What sits here when the process dies is lost from memory only:
    its rows are committed and unstamped, so the sweeper publishes them after
    RUNYARD_DISPATCH_GRACE_SECONDS. Stamps are written once a second while submits keep coming,
    and as soon as they pause for QUIET_SECONDS; a row claimed before its stamp already carries
    one and is skipped.
    """

    STAMP_INTERVAL_SECONDS = 1.0
    # A lull this long stamps what went out: a row published and left unstamped for a whole
    # interval after the last submit raced the sweeper's grace (as short as a second in tests)
    # and was published twice.
    QUIET_SECONDS = 0.1

    def __init__(self) -> None:
        self._reset()
        self._drain_at_exit = False
        # gunicorn and Celery fork: a child starts empty, with a lock nobody holds.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._pending: list[Dispatch] = []
        # Batches of a batch submit: published with publish_many (built once per group).
        self._bulk: list[Dispatch] = []
        self._published: list[uuid.UUID] = []
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, execution_id: uuid.UUID, spec: VersionSpec, priority: int) -> None:
        if db.bound_for_tests:
            # Tests run inside one transaction on one connection; no second thread may touch it.
            publish(execution_id, spec, priority)
            return
        with self._wakeup:
            self._pending.append(Dispatch(execution_id, spec, priority))
            self._wake()

    def submit_many(self, batch: list[Dispatch]) -> None:
        if db.bound_for_tests:
            publish_committed(batch)
            return
        with self._wakeup:
            self._bulk.extend(batch)
            self._wake()

    def _wake(self) -> None:
        """Under the lock: start the thread if need be, and wake it."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
            self._thread.start()
            if not self._drain_at_exit:
                self._drain_at_exit = True
                atexit.register(self.drain)
        self._wakeup.notify()

    def _run(self) -> None:
        last_stamp = time.monotonic()
        while True:
            with self._wakeup:
                if not self._pending and not self._bulk:
                    self._wakeup.wait(
                        timeout=self.QUIET_SECONDS
                        if self._published
                        else self.STAMP_INTERVAL_SECONDS
                    )
                batch, self._pending = self._pending, []
                bulk, self._bulk = self._bulk, []
            quiet = not batch and not bulk
            # Single submits and batches alike go out in bulk: send_task per message cost the
            # API twice the CPU (0.64 ms a message against 0.30 for a lone one in bulk).
            if batch or bulk:
                self._published.extend(publish_many(batch + bulk))
            due = time.monotonic() - last_stamp >= self.STAMP_INTERVAL_SECONDS
            if self._published and (quiet or due):
                last_stamp = time.monotonic()
                stamped, self._published = self._published, []
                try:
                    stamp_dispatched(stamped)
                except Exception:
                    log.warning(
                        "could not stamp %d executions as dispatched", len(stamped), exc_info=True
                    )

    def drain(self) -> None:
        """At a clean exit, publish and stamp what is still waiting, rather than leave it to
        the sweeper's grace period."""
        with self._wakeup:
            batch, self._pending = self._pending, []
            bulk, self._bulk = self._bulk, []
        published = publish_many(batch + bulk)
        stamped, self._published = self._published + published, []
        if stamped:
            with contextlib.suppress(Exception):
                stamp_dispatched(stamped)


dispatcher = Dispatcher()
