"""Celery beat's scheduler: schedules come from PostgreSQL, not from a static beat_schedule.

celeryconfig.py names this class as `beat_scheduler`, so `celery -A workers beat`, `runyard up`
and docker compose all run it. It also runs the sweeper and the other maintenance jobs in a
thread of its own (workers/maintenance.py). Each tick asks the database:

- one indexed query (ix_schedules_due) for the schedules due now, locked with SKIP LOCKED,
  fired set-based (app/schedules/firing.py);
- it sleeps until the next fire time, but never longer than RUNYARD_SCHEDULE_POLL_SECONDS, so
  a schedule created, edited, paused or deleted through the API takes effect within that time
  without a restart.

Several beat processes may run at once: the row locks and the fire record's unique key make
each fire time fire once.
"""

from __future__ import annotations

import logging
import os
import socket

from celery.beat import PersistentScheduler

from app.config import current_config
from app.db import db
from app.schedules import firing
from workers.maintenance import Maintenance, default_jobs, housekeeping_jobs, notification_jobs

log = logging.getLogger(__name__)

# A due schedule another beat holds locked is retried after this, not in a busy loop.
MIN_SLEEP_SECONDS = 0.05


class DatabaseScheduler(PersistentScheduler):
    def setup_schedule(self) -> None:
        super().setup_schedule()
        cfg = current_config()
        if not db.configured:
            db.configure(cfg.require_database())
        self.poll_seconds = cfg.schedule_poll_seconds
        self.fired_by = f"{socket.gethostname()}:{os.getpid()}"
        self.maintenance = Maintenance(default_jobs())
        self.maintenance.start()
        self.notifications = Maintenance(notification_jobs(), name="runyard-notifications")
        self.notifications.start()
        self.housekeeping = Maintenance(housekeeping_jobs(), name="runyard-housekeeping")
        self.housekeeping.start()
        log.info("schedules from PostgreSQL, polled every %ss at most", self.poll_seconds)

    def close(self) -> None:
        for name in ("maintenance", "notifications", "housekeeping"):
            threads = getattr(self, name, None)  # absent if setup_schedule failed
            if threads is not None:
                threads.stop()
        super().close()

    def tick(self, *args, **kwargs) -> float:
        static_delay = super().tick(*args, **kwargs)
        try:
            report = firing.tick(self.fired_by)
        except Exception:  # the database may be away: keep beat alive
            log.exception("firing schedules failed; retrying in %ss", self.poll_seconds)
            return min(static_delay, self.poll_seconds)
        if report.fired or report.skipped or report.buffered or report.failed or report.released:
            log.info(
                "schedules: %d fired, %d skipped, %d buffered, %d failed, %d released, %d paused",
                report.fired,
                report.skipped,
                report.buffered,
                report.failed,
                report.released,
                report.paused,
            )
        delay = self.poll_seconds
        if report.seconds_to_next is not None:
            delay = max(MIN_SLEEP_SECONDS, min(delay, report.seconds_to_next))
        return min(static_delay, delay)
