"""What beat decides for each due schedule before anything is written: which of the fire times
that came due since its last tick fire, which are skipped or buffered, and what the schedule's
row becomes. The decisions only; app/schedules/firing.py selects the due schedules, prepares
each run (`Planner.prepare`) and writes the batch.

The policies, per schedule and tick, over the fire times that came due since its last tick:
- on time: a fire time at most MISFIRE_GRACE old. Older ones were missed (no beat was running).
- catchup: `none` fires no missed time; `latest` fires the newest missed one unless an on-time
  one fires anyway; `all` fires each missed one inside catchup_window_seconds. Missed times
  that do not fire are summed up in one `skipped` record per tick, with the range and the count.
- overlap, against the schedule's last execution (and the fires of this same tick): `allow`
  fires regardless; `skip` fires only when the last execution has finished; `buffer_one` keeps
  one `buffered` fire that runs when the last execution finishes, skipping the rest;
  `cancel_other` cancels the last execution if unfinished and fires the newest time.
"""

from __future__ import annotations

import abc
import datetime as dt
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

MISFIRE_GRACE = dt.timedelta(seconds=5)
# A schedule that missed more fire times than this (a per-second cron after a long outage)
# works through them over several ticks.
MAX_TIMES_PER_TICK = 1000


@dataclass
class Batch:
    """What one transaction writes: built in Python, then written set-based (firing.py)."""

    fires: list[dict[str, Any]] = field(default_factory=list)
    # run id -> what `prepare` built to start that run (firing.py's Launch or ChainLaunch)
    launches: dict[uuid.UUID, Any] = field(default_factory=dict)
    # new run id -> (org, the unfinished run it replaces, whether that one is a chain run)
    cancels: dict[uuid.UUID, tuple[uuid.UUID, uuid.UUID, bool]] = field(default_factory=dict)
    updates: list[dict[str, Any]] = field(default_factory=list)


def _span(times: list[dt.datetime]) -> str:
    if len(times) == 1:
        return f"fire time {times[0].isoformat()}"
    return f"{len(times)} fire times from {times[0].isoformat()} to {times[-1].isoformat()}"


class _Ids:
    """Random (version 4) UUIDs drawn from os.urandom a thousand at a time. uuid4() makes one
    system call per id, and each releases the interpreter lock: with the publishing thread
    busy, that is a thread switch per id (measured: beat CPU for 10,000 fires fell by a tenth)."""

    def __init__(self) -> None:
        self._pool: list[uuid.UUID] = []

    def __call__(self) -> uuid.UUID:
        if not self._pool:
            raw = os.urandom(16 * 1000)
            self._pool = [
                uuid.UUID(bytes=raw[i : i + 16], version=4) for i in range(0, len(raw), 16)
            ]
        return self._pool.pop()


class QuotaRoom(Protocol):
    """What the quotas leave each organization for a batch's runs."""

    def refusal(self, org_id: uuid.UUID) -> str | None: ...

    def take(self, org_id: uuid.UUID) -> None: ...


class NoQuotas:
    def refusal(self, org_id: uuid.UUID) -> str | None:
        return None

    def take(self, org_id: uuid.UUID) -> None:
        return None


class Planner(abc.ABC):
    """Plans due schedules into one Batch. A row is a due schedule as firing.py selects it
    (id, org_id, cron, timezone, next_fire_at, catchup, catchup_window_seconds, overlap,
    target_kind, last_execution_id, last_status, last_is_chain, has_buffered).

    `next_after(cron, timezone, after)` gives the fire time after `after`; `terminal_statuses`
    are the statuses of a last run that has finished; `room` what the organizations' quotas
    leave them (app/flow/quotas.py: Room; by default, no quota)."""

    def __init__(
        self,
        now: dt.datetime,
        next_after: Callable[[str, str, dt.datetime], dt.datetime],
        terminal_statuses: tuple[str, ...],
        room: QuotaRoom | None = None,
    ) -> None:
        self.now = now
        self.next_after = next_after
        self.terminal_statuses = terminal_statuses
        self.room = room or NoQuotas()
        self.new_id = _Ids()
        self.batch = Batch()

    def quota_refusal(self, row: Any) -> str | None:
        """Why the organization's quotas refuse one more run now (a skip), or None."""
        limit = self.room.refusal(row.org_id)
        if limit is None:
            return None
        return f"refused by the organization's quota {limit} (GET /api/v1/usage)"

    @abc.abstractmethod
    def prepare(self, row: Any, run_id: uuid.UUID) -> str | None:
        """Make the run `run_id` of the schedule's target ready to be written; or say why the
        target cannot run this schedule's input now."""

    def record(
        self,
        row: Any,
        fire_time: dt.datetime,
        kind: str,
        status: str,
        reason: str | None = None,
        execution_id: uuid.UUID | None = None,
    ) -> None:
        chain = row.target_kind == "chain"
        self.batch.fires.append(
            {
                "schedule_id": row.id,
                "org_id": row.org_id,
                "fire_time": fire_time,
                "kind": kind,
                "status": status,
                "reason": reason,
                "execution_id": None if chain else execution_id,
                "chain_execution_id": execution_id if chain else None,
                "outcome": "failed" if status == "failed" else None,
            }
        )

    def fire(self, row: Any, fire_time: dt.datetime, kind: str) -> uuid.UUID | None:
        refused = self.quota_refusal(row)
        if refused:
            self.record(row, fire_time, kind, "skipped", refused)
            return None
        execution_id = self.new_id()
        reason = self.prepare(row, execution_id)
        if reason:
            self.record(row, fire_time, kind, "failed", reason)
            return None
        self.room.take(row.org_id)
        self.record(row, fire_time, kind, "fired", execution_id=execution_id)
        return execution_id

    def plan(self, row: Any) -> None:
        start = row.next_fire_at
        following = self.next_after(row.cron, row.timezone, start)
        if self.now - start <= MISFIRE_GRACE and following > self.now and self._free(row):
            # The common case, thousands of times a minute at scale: one fire time, on time,
            # nothing in its way.
            self._fire_on_time(row, start, following)
        else:
            self._plan_due_times(row)

    def _fire_on_time(self, row: Any, fire_time: dt.datetime, following: dt.datetime) -> None:
        execution_id = self.fire(row, fire_time, "scheduled")
        # Not fired: failed (counts towards pause_after_failures), or skipped by a quota.
        failed = self.batch.fires[-1]["status"] == "failed"
        self.batch.updates.append(
            {
                "id": row.id,
                "next_fire_at": following,
                "last_fire_at": None if execution_id is None else fire_time,
                "last_execution_id": execution_id,
                "failures": int(failed),
            }
        )

    def _plan_due_times(self, row: Any) -> None:
        """Every fire time due since the last tick, under the catchup and overlap policies."""
        first_record = len(self.batch.fires)
        start = self._skip_before_horizon(row)
        due, cursor = self._due_times(row, start)
        to_fire = self._catch_up(row, due, reached_now=cursor > self.now)
        last_execution = self.overlap(row, to_fire)
        fired = self.batch.fires[first_record:]
        self.batch.updates.append(
            {
                "id": row.id,
                "next_fire_at": cursor,
                "last_fire_at": max(
                    (f["fire_time"] for f in fired if f["status"] == "fired"), default=None
                ),
                "last_execution_id": last_execution,
                "failures": sum(1 for f in fired if f["status"] == "failed"),
            }
        )

    def _skip_before_horizon(self, row: Any) -> dt.datetime:
        """The first fire time worth walking through: those before the horizon are recorded
        as skipped."""
        start, now = row.next_fire_at, self.now
        window_start = now - dt.timedelta(seconds=row.catchup_window_seconds)
        # Fire times before the horizon cannot run under any policy: one record covers them
        # all, without walking through them.
        horizon = now - MISFIRE_GRACE
        if row.catchup != "none":
            horizon = min(horizon, window_start)
        if start >= horizon:
            return start
        self.record(
            row,
            start,
            "catchup",
            "skipped",
            f"missed from {start.isoformat()} until {horizon.isoformat()} while no "
            "scheduler ran"
            + (
                " (catchup none)"
                if row.catchup == "none"
                else f": before the catch-up window ({row.catchup_window_seconds} s)"
            ),
        )
        return self.next_after(row.cron, row.timezone, horizon - dt.timedelta(microseconds=1))

    def _due_times(self, row: Any, start: dt.datetime) -> tuple[list[dt.datetime], dt.datetime]:
        """The fire times from `start` up to now, at most MAX_TIMES_PER_TICK of them, and the
        fire time after them (the schedule's next)."""
        due: list[dt.datetime] = []
        cursor = start
        while cursor <= self.now and len(due) < MAX_TIMES_PER_TICK:
            due.append(cursor)
            cursor = self.next_after(row.cron, row.timezone, cursor)
        return due, cursor

    def _catch_up(
        self, row: Any, due: list[dt.datetime], *, reached_now: bool
    ) -> list[tuple[dt.datetime, str]]:
        """The due times to fire, each with its kind; the missed times the catchup policy
        passes over are recorded as skipped."""
        missed = [t for t in due if self.now - t > MISFIRE_GRACE]
        on_time = [t for t in due if self.now - t <= MISFIRE_GRACE]
        chosen: list[dt.datetime] = []
        if row.catchup == "all":
            chosen = missed
        elif row.catchup == "latest" and missed and not on_time and reached_now:
            chosen = missed[-1:]
        passed_over = [t for t in missed if t not in chosen]
        if passed_over:
            why = {
                "none": "catchup none",
                "latest": "catchup latest: only the newest missed fire time runs",
                "all": "",
            }[row.catchup]
            self.record(
                row,
                passed_over[0],
                "catchup",
                "skipped",
                f"{_span(passed_over)} missed while no scheduler ran ({why})",
            )
        return [(t, "catchup") for t in chosen] + [(t, "scheduled") for t in on_time]

    def _free(self, row: Any) -> bool:
        """May a fire go ahead without the overlap policy having a say?"""
        return (
            row.overlap == "allow"
            or row.last_status is None
            or row.last_status in self.terminal_statuses
        ) and not (row.overlap == "buffer_one" and row.has_buffered)

    def overlap(self, row: Any, to_fire: list[tuple[dt.datetime, str]]) -> uuid.UUID | None:
        """Apply the overlap policy; the id of the newest execution created, if any."""
        if not to_fire:
            return None
        running = row.last_status is not None and row.last_status not in self.terminal_statuses
        run = "chain execution" if row.last_is_chain else "execution"
        busy = f"{run} {row.last_execution_id} is still {row.last_status}"
        newest: uuid.UUID | None = None
        if row.overlap == "allow":
            for fire_time, kind in to_fire:
                newest = self.fire(row, fire_time, kind) or newest
            return newest
        if row.overlap == "cancel_other":
            *older, (fire_time, kind) = to_fire
            for skipped_time, skipped_kind in older:
                self.record(
                    row,
                    skipped_time,
                    skipped_kind,
                    "skipped",
                    f"overlap cancel_other: superseded by the fire at {fire_time.isoformat()}",
                )
            newest = self.fire(row, fire_time, kind)
            if newest and running:
                self.batch.cancels[newest] = (row.org_id, row.last_execution_id, row.last_is_chain)
            return newest
        # skip and buffer_one
        buffer_free = row.overlap == "buffer_one" and not row.has_buffered
        for fire_time, kind in to_fire:
            if not running:
                newest = self.fire(row, fire_time, kind)
                running = newest is not None
                busy = f"the fire at {fire_time.isoformat()} is still queued"
            elif buffer_free:
                self.record(row, fire_time, kind, "buffered", f"waiting: {busy}")
                buffer_free = False
            else:
                reason = (
                    f"overlap skip: {busy}"
                    if row.overlap == "skip"
                    else f"overlap buffer_one: one fire already waits and {busy}"
                )
                self.record(row, fire_time, kind, "skipped", reason)
        return newest
