"""The lease heartbeat of the attempts a worker process runs.

A claim leases its attempt for RUNYARD_LEASE_SECONDS only. One thread per pool process renews
the leases of the attempts the process still runs, every third of the lease, with one UPDATE
fenced by the attempt (store.renew_leases). A process that dies (SIGKILL, the OOM killer, a
lost host) stops renewing, and the sweeper takes its execution back within the lease plus
RUNYARD_SWEEP_INTERVAL_SECONDS, whatever the agent's timeout.

Every runtime is covered, because the runner holds the lease around all of them. An attempt that
ends within a third of the lease is never renewed: short executions pay two dict writes and no
statement. The thread renews whatever the main thread is doing (a python agent computing, a child
runtime's supervisor waiting): a process that is alive but stuck is the timeouts' business.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

from app.config import current_config
from app.db import db
from app.executions import store
from app.executions.spec import Claim

log = logging.getLogger(__name__)


@dataclass
class Held:
    claimed: Claim
    renewed_at: float
    # Set once the agent is done and its outcome is being written (see `settling`).
    settling: bool = False


class LeaseKeeper:
    def __init__(self) -> None:
        self._reset()
        # Threads do not survive a fork: a pool process starts empty and builds its own thread.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._held: dict[uuid.UUID, Held] = {}
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def hold(self, claimed: Claim) -> None:
        """Keep the claimed attempt's lease fresh until `release` (after its outcome is
        recorded: a lease must not run out between the agent's return and the finish)."""
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="runyard-lease", daemon=True)
                self._thread.start()
            self._held[claimed.execution_id] = Held(claimed, time.monotonic())
            self._changed.notify()

    def release(self, claimed: Claim) -> None:
        with self._changed:
            held = self._held.get(claimed.execution_id)
            # This claim's, not a later one of the same execution (a resumed durable execution
            # goes on in the same attempt): a release that comes late must not drop it.
            if held is not None and held.claimed is claimed:
                del self._held[claimed.execution_id]

    def settling(self, claimed: Claim) -> None:
        """The agent is done and the runner writes its outcome: the lease is still renewed
        (the write may wait for the database), but a renewal that finds the attempt ended says
        nothing, as the outcome may just have been written. The runner reports an outcome
        fenced out itself."""
        with self._changed:
            held = self._held.get(claimed.execution_id)
            if held is not None:
                held.settling = True

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._held:
                    self._changed.wait()
            lease = current_config().lease_seconds
            interval = lease / 3
            # Looking twice per interval: a lease is renewed at most half a lease after the last.
            time.sleep(interval / 2)
            try:
                self.renew_due(lease, interval)
            except Exception:
                # The database may be away for a moment; the next look tries again, and a lease
                # that runs out meanwhile costs a rerun of the attempt (fenced), never its loss.
                log.warning("lease renewal failed", exc_info=True)

    def renew_due(self, lease: float, interval: float) -> None:
        now = time.monotonic()
        with self._changed:
            due = [held for held in self._held.values() if now - held.renewed_at >= interval]
        if not due:
            return
        with db.hot() as conn:
            owned = store.renew_leases(conn, [held.claimed for held in due], lease)
        with self._changed:
            for held in due:
                if held.claimed.execution_id in owned:
                    held.renewed_at = now
                elif self._held.get(held.claimed.execution_id) is held:
                    del self._held[held.claimed.execution_id]
                    if held.settling:
                        continue
                    # The agent still runs and is left to finish: stopping it would not make
                    # its effects undone, and what it returns is dropped by the fence anyway.
                    log.warning(
                        "execution %s attempt %d: LEASE LOST: the attempt is no longer this "
                        "worker's (its lease ran out and the sweeper took it back, or it was "
                        "ended without it). The agent runs on, but its outcome and log lines "
                        "will be fenced out; the execution goes on as the sweeper decided",
                        held.claimed.execution_id,
                        held.claimed.attempt,
                    )


lease_keeper = LeaseKeeper()
