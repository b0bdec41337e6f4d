"""The durable calls of one attempt, answered from the execution's journal (app/durable).

Each durable call of a run gets the next number: 1, 2, 3... A number the journal holds is
answered from it (the call must be the same kind and name, else the run is nondeterministic);
a new one is made and recorded. A call that must wait (a child not ended, a sleep not due, an
event not sent) raises Suspended: the run ends, the execution waits, and what it waits for
queues it again, to run from the start and replay.

The journal is read on the first durable call only: an agent that makes none pays nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from app.db import DATABASE_ERRORS
from app.durable import children, journal, waits
from app.executions.spec import Claim
from app.executions.waiting import Wait
from workers.attempt import AttemptDatabase
from workers.context import ChildFailed, Nondeterministic, Suspended

MIN_SLEEP_SECONDS = 1.0
# How long a durable call waits for PostgreSQL to answer again (a restart, a failover) before
# it fails the run; the agent's timeout_seconds comes first when shorter.
DATABASE_PATIENCE_SECONDS = 120.0
FIRST_PAUSE_SECONDS = 0.5
MAX_PAUSE_SECONDS = 5.0

log = logging.getLogger(__name__)
T = TypeVar("T")


def _json_copy(value: Any, what: str) -> Any:
    """`value` as the journal gives it back: a replay must see what the first run saw."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{what} must be JSON (dict, list, str, number, bool, None): {exc}"
        ) from exc


class Journal:
    def __init__(self, database: AttemptDatabase, claimed: Claim) -> None:
        self._database = database
        self._claimed = claimed
        self._entries: dict[int, journal.Entry] | None = None
        self._seq = 0

    @property
    def _id(self) -> uuid.UUID:
        return self._claimed.execution_id

    def _database_answering(self, action: Callable[[Any, bool], T]) -> T:
        """`action(conn, retried)` once PostgreSQL answers: a restart or a failover during a
        durable call delays the agent instead of failing it. A try that committed but lost its
        answer is seen by the next (`retried`: look for what an earlier try recorded)."""
        deadline = time.monotonic() + DATABASE_PATIENCE_SECONDS
        pause, retried = FIRST_PAUSE_SECONDS, False
        while True:
            try:
                with self._database.connection() as conn:
                    return action(conn, retried)
            except DATABASE_ERRORS:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning(
                    "execution %s: the database cannot answer a durable call; trying again in "
                    "%.1fs",
                    self._id,
                    pause,
                )
            time.sleep(pause)
            pause, retried = min(pause * 2, MAX_PAUSE_SECONDS), True

    def _recorded(self, conn: Any, retried: bool, seq: int) -> journal.Entry | None:
        return journal.entry(conn, self._id, seq) if retried else None

    def _next(self, kind: str, name: str) -> tuple[int, journal.Entry | None]:
        if self._entries is None:
            self._entries = self._database_answering(
                lambda conn, _retried: journal.entries(conn, self._id)
            )
        self._seq += 1
        found = self._entries.get(self._seq)
        if found is not None and (found.kind != kind or found.name != name):
            raise Nondeterministic(
                f"durable call #{self._seq} differs from the journal: this run asked for "
                f"{kind} {name!r}, the journal holds {found.kind} {found.name!r} (recorded "
                f"{found.at.isoformat()}); code between durable calls must make the same "
                "calls in the same order on every run"
            )
        return self._seq, found

    def abandon(self, seq: int) -> None:
        """The call numbered `seq` failed before it was recorded (a step whose function raised,
        a child refused): the next call takes its number, as it will on a replay."""
        if seq == self._seq and (self._entries is None or seq not in self._entries):
            self._seq -= 1

    def _keep(self, entry: journal.Entry) -> journal.Entry:
        assert self._entries is not None
        self._entries[entry.seq] = entry
        return entry

    # ctx.step ----------------------------------------------------------------------------

    def step_begin(self, name: str) -> tuple[bool, int, Any]:
        seq, found = self._next("step", name)
        return (True, seq, found.result) if found is not None else (False, seq, None)

    def step_record(self, seq: int, name: str, value: Any) -> Any:
        try:
            value = _json_copy(value, f"the result of ctx.step({name!r})")
        except TypeError:
            self.abandon(seq)
            raise

        def record(conn: Any, retried: bool) -> journal.Entry:
            return self._recorded(conn, retried, seq) or journal.record(
                conn,
                self._id,
                self._claimed.attempt,
                seq,
                "step",
                name,
                status="done",
                result=value,
            )

        self._keep(self._database_answering(record))
        return value

    # children ------------------------------------------------------------------------------

    def start(self, agent: str, payload: Any, version: str | None = None) -> str:
        if not isinstance(agent, str) or not agent:
            raise TypeError("ctx.start(agent, input): agent must be a name or an id")
        seq, found = self._next("child", agent)
        if found is not None:
            return str(found.child_execution_id)
        try:
            payload = _json_copy(payload, f"the input of ctx.start({agent!r})")

            def start(conn: Any, retried: bool) -> uuid.UUID:
                earlier = self._recorded(conn, retried, seq)
                if earlier is not None:
                    return earlier.child_execution_id
                return children.start(
                    conn,
                    self._claimed.org_id,
                    self._id,
                    self._claimed.attempt,
                    seq,
                    agent,
                    payload,
                    version,
                )

            child_id = self._database_answering(start)
        except Exception:
            self.abandon(seq)
            raise
        now = dt.datetime.now(dt.UTC)
        self._keep(journal.Entry(seq, "child", agent, "pending", None, child_id, None, now))
        return str(child_id)

    def wait(self, ids: list[str]) -> list[Any]:
        # Read afresh: the children's ends are written into the journal as they happen.
        recorded = self._database_answering(lambda conn, _retried: journal.entries(conn, self._id))
        mine = {str(e.child_execution_id): e for e in recorded.values() if e.kind == "child"}
        unknown = [child for child in ids if str(child) not in mine]
        if unknown:
            raise ValueError(f"ctx.wait: {unknown[0]} is not a child this execution started")
        pending = [uuid.UUID(str(child)) for child in ids if mine[str(child)].status == "pending"]
        if pending:
            raise Suspended(Wait(awaiting=pending))
        outputs = []
        for child in ids:
            entry = mine[str(child)]
            result = entry.result or {}
            if entry.status != "succeeded":
                raise ChildFailed(str(child), entry.name, entry.status, result.get("error"))
            outputs.append(result.get("output"))
        return outputs

    # sleeps --------------------------------------------------------------------------------

    def sleep(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError("ctx.sleep(seconds): seconds must be a number")
        if math.isnan(seconds) or seconds < MIN_SLEEP_SECONDS:
            raise ValueError(
                f"ctx.sleep({seconds!r}): a durable sleep is at least {MIN_SLEEP_SECONDS:g} s; "
                "use time.sleep for a shorter pause"
            )
        self._sleep("sleep", seconds=float(seconds))

    def sleep_until(self, when: Any) -> None:
        if isinstance(when, str):
            try:
                when = dt.datetime.fromisoformat(when)
            except ValueError as exc:
                raise ValueError(f"ctx.sleep_until({when!r}): not an ISO 8601 time") from exc
        if not isinstance(when, dt.datetime) or when.tzinfo is None:
            raise TypeError(
                "ctx.sleep_until(when): when must be an aware datetime (or ISO 8601 text with "
                "its UTC offset)"
            )
        self._sleep("sleep_until", until=when)

    def _sleep(self, name: str, **due: Any) -> None:
        seq, first = self._next("sleep", name)

        def sleep(conn: Any, retried: bool) -> journal.Entry:
            found = first or self._recorded(conn, retried, seq)
            if found is None:
                found = journal.record(
                    conn,
                    self._id,
                    self._claimed.attempt,
                    seq,
                    "sleep",
                    name,
                    status="pending",
                    **due,
                )
            if found.status == "pending":
                found = journal.settle_pending(conn, self._id, self._claimed.attempt, seq, "done")
            return found

        found = self._keep(self._database_answering(sleep))
        if found.status == "pending":
            raise Suspended(Wait(awaiting=[], wake_at=found.due_at))

    # events --------------------------------------------------------------------------------

    def wait_for_event(
        self, name: str, match: dict | None, timeout_seconds: float, lookback_seconds: float
    ) -> Any:
        if not isinstance(name, str) or not name:
            raise TypeError("ctx.wait_for_event(name): name must be a non-empty string")
        for what, value in (
            ("timeout_seconds", timeout_seconds),
            ("lookback_seconds", lookback_seconds),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"ctx.wait_for_event: {what} must be a number >= 0")
        seq, first = self._next("event", name)

        def wait(conn: Any, retried: bool) -> journal.Entry:
            found = first or self._recorded(conn, retried, seq)
            if found is None:
                found = waits.register(
                    conn,
                    self._claimed.org_id,
                    self._id,
                    self._claimed.attempt,
                    seq,
                    name,
                    _json_copy(match, "match"),
                    float(timeout_seconds),
                    float(lookback_seconds),
                )
            if found.status == "pending":
                found = journal.settle_pending(
                    conn, self._id, self._claimed.attempt, seq, "timed_out"
                )
            return found

        found = self._keep(self._database_answering(wait))
        if found.status == "received":
            return found.result
        if found.status == "timed_out":
            return None
        raise Suspended(Wait(awaiting=[], wake_at=found.due_at, event_seq=seq))
