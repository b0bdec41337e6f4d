"""The schedule planner (app/schedules/planner.py) on its own: which due fire times fire, are
skipped or buffered under the catchup and overlap policies, and what each schedule row becomes.

No database: a due schedule is a plain object with the columns firing.py's _DUE selects, and
the targets always start unless a schedule says why not. tests/workers/test_schedules_live.py
runs the same policies through beat and a worker."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field

from app.schedules import cron
from app.schedules.firing import TERMINAL
from app.schedules.planner import MAX_TIMES_PER_TICK, MISFIRE_GRACE, Planner

UTC = dt.UTC
ORG = uuid.UUID(int=1)
LAST = uuid.UUID(int=2)


def at(hour: int, minute: int, second: int = 0) -> dt.datetime:
    return dt.datetime(2024, 5, 1, hour, minute, second, tzinfo=UTC)


@dataclass
class Due:
    """A due schedule, as beat selects it. Defaults: every minute, on time, nothing running."""

    next_fire_at: dt.datetime
    cron: str = "* * * * *"
    timezone: str = "UTC"
    catchup: str = "none"
    catchup_window_seconds: int = 3600
    overlap: str = "skip"
    target_kind: str = "agent"
    last_execution_id: uuid.UUID | None = None
    last_status: str | None = None
    last_is_chain: bool = False
    has_buffered: bool = False
    # Not a column: why this schedule's target refuses to run (the planner's prepare says so).
    refusal: str | None = None
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    org_id: uuid.UUID = ORG


class StubPlanner(Planner):
    """The planner with targets that start unless the schedule carries a refusal."""

    def __init__(self, now: dt.datetime, room=None) -> None:
        super().__init__(now, cron.next_after, TERMINAL, room)
        self.prepared: list[uuid.UUID] = []

    def prepare(self, row: Due, run_id: uuid.UUID) -> str | None:
        if row.refusal:
            return row.refusal
        self.prepared.append(run_id)
        return None


def plan(now: dt.datetime, *rows: Due) -> StubPlanner:
    planner = StubPlanner(now)
    for row in rows:
        planner.plan(row)
    return planner


def fires(planner: Planner) -> list[tuple[dt.datetime, str, str]]:
    return [(f["fire_time"], f["kind"], f["status"]) for f in planner.batch.fires]


def reasons(planner: Planner) -> list[str | None]:
    return [f["reason"] for f in planner.batch.fires]


# --- on time ----------------------------------------------------------------------------------


def test_an_on_time_fire_time_fires_and_the_schedule_moves_to_the_next():
    row = Due(next_fire_at=at(12, 0))
    planner = plan(at(12, 0, 2), row)
    [run_id] = planner.prepared
    assert planner.batch.fires == [
        {
            "schedule_id": row.id,
            "org_id": ORG,
            "fire_time": at(12, 0),
            "kind": "scheduled",
            "status": "fired",
            "reason": None,
            "execution_id": run_id,
            "chain_execution_id": None,
            "outcome": None,
        }
    ]
    assert planner.batch.updates == [
        {
            "id": row.id,
            "next_fire_at": at(12, 1),
            "last_fire_at": at(12, 0),
            "last_execution_id": run_id,
            "failures": 0,
        }
    ]
    assert planner.batch.cancels == {}
    assert run_id.version == 4


class Places:
    """A quota room with `left` places for the one organization, then max_queued."""

    def __init__(self, left: int) -> None:
        self.left = left

    def refusal(self, org_id: uuid.UUID) -> str | None:
        assert org_id == ORG
        return None if self.left > 0 else "max_queued"

    def take(self, org_id: uuid.UUID) -> None:
        self.left -= 1


def planned_with(room: Places, *rows: Due) -> StubPlanner:
    planner = StubPlanner(at(12, 0, 2), room)
    for row in rows:
        planner.plan(row)
    return planner


def test_a_fire_a_quota_refuses_is_skipped_and_counts_as_no_failure():
    planner = planned_with(Places(0), Due(next_fire_at=at(12, 0)))
    assert planner.prepared == [], "nothing is built for a refused run"
    assert fires(planner) == [(at(12, 0), "scheduled", "skipped")]
    assert reasons(planner) == [
        "refused by the organization's quota max_queued (GET /api/v1/usage)"
    ]
    [update] = planner.batch.updates
    assert update["failures"] == 0 and update["last_fire_at"] is None
    assert update["next_fire_at"] == at(12, 1)


def test_the_places_a_quota_leaves_are_counted_down_by_prepared_runs_only():
    room = Places(1)
    planner = planned_with(
        room,
        Due(next_fire_at=at(12, 0), refusal="the agent is archived"),
        Due(next_fire_at=at(12, 0)),
        Due(next_fire_at=at(12, 0)),
    )
    statuses = [status for _, _, status in fires(planner)]
    assert statuses == ["failed", "fired", "skipped"], "a failed run takes no place"
    assert room.left == 0 and len(planner.prepared) == 1


def test_a_chain_targets_run_is_a_chain_execution():
    planner = plan(at(12, 0, 2), Due(next_fire_at=at(12, 0), target_kind="chain"))
    [record] = planner.batch.fires
    assert record["execution_id"] is None
    assert record["chain_execution_id"] == planner.prepared[0]


def test_a_target_that_cannot_run_fails_the_fire_and_counts_a_failure():
    row = Due(next_fire_at=at(12, 0), refusal="the agent is archived")
    planner = plan(at(12, 0, 2), row)
    [record] = planner.batch.fires
    assert (record["status"], record["outcome"], record["reason"]) == (
        "failed",
        "failed",
        "the agent is archived",
    )
    assert record["execution_id"] is None and record["chain_execution_id"] is None
    assert planner.batch.updates == [
        {
            "id": row.id,
            "next_fire_at": at(12, 1),
            "last_fire_at": None,
            "last_execution_id": None,
            "failures": 1,
        }
    ]


def test_the_grace_decides_between_on_time_and_missed():
    on_time = plan(at(12, 0) + MISFIRE_GRACE, Due(next_fire_at=at(12, 0)))
    assert fires(on_time) == [(at(12, 0), "scheduled", "fired")]
    missed = plan(at(12, 0) + MISFIRE_GRACE + dt.timedelta(seconds=1), Due(next_fire_at=at(12, 0)))
    assert fires(missed) == [(at(12, 0), "catchup", "skipped")]
    assert missed.prepared == []


def test_several_on_time_fire_times_all_fire():
    # A per-second cron two seconds late: three fire times, all inside the grace.
    row = Due(next_fire_at=at(12, 0), cron="* * * * * *", overlap="allow")
    planner = plan(at(12, 0, 2), row)
    assert fires(planner) == [
        (at(12, 0, 0), "scheduled", "fired"),
        (at(12, 0, 1), "scheduled", "fired"),
        (at(12, 0, 2), "scheduled", "fired"),
    ]
    assert planner.batch.updates[0]["next_fire_at"] == at(12, 0, 3)


def test_a_fire_time_exactly_the_grace_old_is_on_time_behind_missed_ones():
    planner = plan(at(12, 0) + MISFIRE_GRACE, Due(next_fire_at=at(11, 59)))
    assert fires(planner) == [(at(11, 59), "catchup", "skipped"), (at(12, 0), "scheduled", "fired")]


# --- catchup ----------------------------------------------------------------------------------


def test_catchup_none_skips_every_missed_time_in_one_record_and_fires_the_on_time_one():
    row = Due(next_fire_at=at(11, 55), catchup="none")
    planner = plan(at(12, 0, 2), row)
    assert fires(planner) == [(at(11, 55), "catchup", "skipped"), (at(12, 0), "scheduled", "fired")]
    assert reasons(planner)[0] == (
        "missed from 2024-05-01T11:55:00+00:00 until 2024-05-01T11:59:57+00:00 while no "
        "scheduler ran (catchup none)"
    )
    [update] = planner.batch.updates
    assert update["next_fire_at"] == at(12, 1) and update["last_fire_at"] == at(12, 0)
    assert update["failures"] == 0


def test_catchup_latest_fires_nothing_missed_when_an_on_time_fire_runs_anyway():
    planner = plan(at(12, 0, 2), Due(next_fire_at=at(11, 55), catchup="latest"))
    assert fires(planner) == [(at(11, 55), "catchup", "skipped"), (at(12, 0), "scheduled", "fired")]
    assert reasons(planner)[0] == (
        "5 fire times from 2024-05-01T11:55:00+00:00 to 2024-05-01T11:59:00+00:00 missed "
        "while no scheduler ran (catchup latest: only the newest missed fire time runs)"
    )


def test_catchup_latest_fires_the_newest_missed_time_when_none_is_on_time():
    planner = plan(at(12, 0, 30), Due(next_fire_at=at(11, 55), catchup="latest"))
    assert fires(planner) == [(at(11, 55), "catchup", "skipped"), (at(12, 0), "catchup", "fired")]
    assert reasons(planner)[0].startswith("5 fire times from 2024-05-01T11:55:00+00:00 to ")
    [update] = planner.batch.updates
    assert update["next_fire_at"] == at(12, 1) and update["last_fire_at"] == at(12, 0)


def test_catchup_all_fires_each_missed_time_inside_the_window_and_skips_those_before_it():
    row = Due(next_fire_at=at(11, 50), catchup="all", catchup_window_seconds=180, overlap="allow")
    planner = plan(at(12, 0, 30), row)
    assert fires(planner) == [
        (at(11, 50), "catchup", "skipped"),
        (at(11, 58), "catchup", "fired"),
        (at(11, 59), "catchup", "fired"),
        (at(12, 0), "catchup", "fired"),
    ]
    assert reasons(planner)[0] == (
        "missed from 2024-05-01T11:50:00+00:00 until 2024-05-01T11:57:30+00:00 while no "
        "scheduler ran: before the catch-up window (180 s)"
    )
    assert len(planner.prepared) == 3
    [update] = planner.batch.updates
    assert update == {
        "id": row.id,
        "next_fire_at": at(12, 1),
        "last_fire_at": at(12, 0),
        "last_execution_id": planner.prepared[-1],
        "failures": 0,
    }


def test_a_long_backlog_is_worked_through_over_several_ticks():
    start = at(12, 0)
    row = Due(next_fire_at=start, cron="* * * * * *", catchup="latest")
    planner = plan(start + dt.timedelta(seconds=2 * MAX_TIMES_PER_TICK), row)
    [record] = planner.batch.fires
    assert (record["fire_time"], record["status"]) == (start, "skipped")
    assert record["reason"].startswith(f"{MAX_TIMES_PER_TICK} fire times from ")
    # `latest` waits for the tick that reaches now before it fires the newest missed time.
    assert planner.prepared == []
    [update] = planner.batch.updates
    assert update["next_fire_at"] == start + dt.timedelta(seconds=MAX_TIMES_PER_TICK)
    assert update["last_fire_at"] is None


# --- overlap ----------------------------------------------------------------------------------


def test_overlap_skip_skips_while_the_last_execution_runs():
    row = Due(next_fire_at=at(12, 0), last_execution_id=LAST, last_status="running")
    planner = plan(at(12, 0, 2), row)
    assert fires(planner) == [(at(12, 0), "scheduled", "skipped")]
    assert reasons(planner) == [f"overlap skip: execution {LAST} is still running"]
    assert planner.batch.updates == [
        {
            "id": row.id,
            "next_fire_at": at(12, 1),
            "last_fire_at": None,
            "last_execution_id": None,
            "failures": 0,
        }
    ]


def test_overlap_skip_fires_once_the_last_execution_finished():
    for status in TERMINAL:
        row = Due(next_fire_at=at(12, 0), last_execution_id=LAST, last_status=status)
        assert fires(plan(at(12, 0, 2), row)) == [(at(12, 0), "scheduled", "fired")], status


def test_overlap_skip_lets_only_the_first_of_several_due_times_fire():
    row = Due(next_fire_at=at(11, 58), catchup="all")
    planner = plan(at(12, 0, 30), row)
    assert fires(planner) == [
        (at(11, 58), "catchup", "fired"),
        (at(11, 59), "catchup", "skipped"),
        (at(12, 0), "catchup", "skipped"),
    ]
    assert reasons(planner)[1] == (
        "overlap skip: the fire at 2024-05-01T11:58:00+00:00 is still queued"
    )


def test_overlap_allow_fires_regardless():
    row = Due(
        next_fire_at=at(12, 0), overlap="allow", last_status="running", last_execution_id=LAST
    )
    planner = plan(at(12, 0, 2), row)
    assert fires(planner) == [(at(12, 0), "scheduled", "fired")]
    assert planner.batch.cancels == {}


def test_overlap_buffer_one_keeps_one_fire_waiting_and_skips_the_rest():
    row = Due(
        next_fire_at=at(11, 58),
        catchup="all",
        overlap="buffer_one",
        last_execution_id=LAST,
        last_status="queued",
        last_is_chain=True,
    )
    planner = plan(at(12, 0, 30), row)
    assert fires(planner) == [
        (at(11, 58), "catchup", "buffered"),
        (at(11, 59), "catchup", "skipped"),
        (at(12, 0), "catchup", "skipped"),
    ]
    busy = f"chain execution {LAST} is still queued"
    assert reasons(planner) == [
        f"waiting: {busy}",
        f"overlap buffer_one: one fire already waits and {busy}",
        f"overlap buffer_one: one fire already waits and {busy}",
    ]
    assert planner.prepared == []
    assert planner.batch.updates[0]["last_execution_id"] is None


def test_overlap_buffer_one_with_a_fire_already_waiting_skips():
    row = Due(
        next_fire_at=at(12, 0),
        overlap="buffer_one",
        last_execution_id=LAST,
        last_status="running",
        has_buffered=True,
    )
    planner = plan(at(12, 0, 2), row)
    assert fires(planner) == [(at(12, 0), "scheduled", "skipped")]
    assert reasons(planner) == [
        f"overlap buffer_one: one fire already waits and execution {LAST} is still running"
    ]


def test_overlap_buffer_one_fires_when_the_last_execution_finished():
    row = Due(next_fire_at=at(12, 0), overlap="buffer_one", last_status="succeeded")
    assert fires(plan(at(12, 0, 2), row)) == [(at(12, 0), "scheduled", "fired")]


def test_overlap_cancel_other_fires_the_newest_time_and_cancels_the_running_execution():
    row = Due(
        next_fire_at=at(11, 58),
        catchup="all",
        overlap="cancel_other",
        last_execution_id=LAST,
        last_status="running",
        last_is_chain=True,
    )
    planner = plan(at(12, 0, 30), row)
    assert fires(planner) == [
        (at(11, 58), "catchup", "skipped"),
        (at(11, 59), "catchup", "skipped"),
        (at(12, 0), "catchup", "fired"),
    ]
    assert reasons(planner)[0] == (
        "overlap cancel_other: superseded by the fire at 2024-05-01T12:00:00+00:00"
    )
    [newest] = planner.prepared
    assert planner.batch.cancels == {newest: (ORG, LAST, True)}
    assert planner.batch.updates[0]["last_execution_id"] == newest


def test_overlap_cancel_other_cancels_nothing_finished_or_when_its_fire_failed():
    finished = Due(next_fire_at=at(12, 0), overlap="cancel_other", last_status="failed")
    assert plan(at(12, 0, 2), finished).batch.cancels == {}
    finished_before_a_backlog = Due(
        next_fire_at=at(11, 58), catchup="all", overlap="cancel_other", last_status="succeeded"
    )
    planner = plan(at(12, 0, 30), finished_before_a_backlog)
    assert [f["status"] for f in planner.batch.fires] == ["skipped", "skipped", "fired"]
    assert planner.batch.cancels == {}
    refused = Due(
        next_fire_at=at(12, 0),
        overlap="cancel_other",
        last_execution_id=LAST,
        last_status="running",
        refusal="the chain cannot run: step 'a' has no agent",
    )
    planner = plan(at(12, 0, 2), refused)
    assert fires(planner) == [(at(12, 0), "scheduled", "failed")]
    assert planner.batch.cancels == {}


# --- failures (pause_after_failures counts them) ----------------------------------------------


def test_each_failed_fire_of_a_tick_counts_for_its_own_schedule():
    failing = Due(
        next_fire_at=at(11, 58),
        catchup="all",
        overlap="allow",
        refusal="the input no longer matches the agent's input_schema",
    )
    healthy = Due(next_fire_at=at(11, 58), catchup="all", overlap="allow")
    planner = plan(at(12, 0, 30), failing, healthy)
    assert [f["status"] for f in planner.batch.fires] == ["failed"] * 3 + ["fired"] * 3
    assert [f["outcome"] for f in planner.batch.fires] == ["failed"] * 3 + [None] * 3
    by_id = {u["id"]: u for u in planner.batch.updates}
    assert by_id[failing.id]["failures"] == 3 and by_id[failing.id]["last_fire_at"] is None
    assert by_id[failing.id]["last_execution_id"] is None
    assert by_id[healthy.id]["failures"] == 0 and by_id[healthy.id]["last_fire_at"] == at(12, 0)
    assert len(set(planner.prepared)) == 3
