"""Which executions may start: organization `max_running`, agent `concurrency` and `rate_limit`,
and the fair window (see ARCHITECTURE.md, "Flow control lives in PostgreSQL").

An execution a limit applies to is stored held back (`waiting_for` says which limit, no message
in the broker) and is let out by `release`, which runs under its organization's flow lock in
the transaction that freed a slot: the submit that stored it, the worker's finish, a cancel,
and beat's flow tick (which also covers what no transaction frees by itself: a rate-limit window
that moves on, a lease the sweeper ended, a slot freed before a crash). A slot is a row that
runs or was let out to run, so a slot cannot leak: every end of an execution frees it, and
held rows stay in PostgreSQL through a broker's loss.

An execution no limit touches is held back only when its organization already has a full fair
window of unclaimed messages on its queue (entries.WAITING_FOR_SQL); each claim lets out the next
one (store.claim), and the flow tick tops windows up after a crash.

Beside store.py and leases.py, the one module that writes `executions`.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import Connection

from app import outbox
from app.config import current_config
from app.db import db, driver
from app.errors import Conflict
from app.executions import dispatch
from app.executions.dispatch import Dispatch
from app.executions.entries import Entry
from app.executions.spec import VersionSpec, error_body
from app.executions.store import LetOut, notify_if_watched
from app.executions.versions import specs
from app.flow.limits import cache

log = logging.getLogger(__name__)

_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
_TRY_LOCK = "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))"


def _lock_key(org_id: uuid.UUID) -> str:
    return f"runyard:flow:{org_id}"


def entry(conn: Connection, org_id: uuid.UUID, spec: VersionSpec) -> Entry:
    """How new executions of `spec` enter: held for a limit, or through the fair window."""
    limits = cache.get(conn, org_id)
    if limits.max_running is not None:
        return Entry(hold="org_max_running")
    if spec.concurrency is not None:
        return Entry(hold="agent_concurrency")
    if spec.rate_limit is not None:
        return Entry(hold="agent_rate_limit")
    return Entry(window=current_config().fair_window * limits.weight)


def lock(conn: Connection, org_id: uuid.UUID) -> None:
    """The organization's flow lock, held to the end of the caller's transaction."""
    driver(conn).execute(_LOCK, (_lock_key(org_id),))


# ---------------------------------------------------------------------------------------------
# on_limit: reject and cancel_running, decided under the flow lock

_GROUP_COUNT = """
    SELECT count(*) FROM executions
    WHERE agent_id = %s AND flow_key = %s AND status IN ('queued', 'running')
"""

# A newer execution supersedes its key's: the waiting ones end here, the running ones are asked
# to stop (their worker records `cancelled`, keeping this error) and free their slot then.
# A queued execution it cancels has its execution.cancelled event written here (app/outbox.py,
# delivered by beat's poll); a running one's comes with its finish.
_SUPERSEDE = (
    """
    WITH changed AS (
        UPDATE executions
        SET status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
            finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
            lease_until = CASE WHEN status = 'queued' THEN NULL ELSE lease_until END,
            waiting_for = NULL,
            cancel_requested_at = coalesce(cancel_requested_at, now()),
            error = %s
        WHERE agent_id = %s AND flow_key = %s AND status IN ('queued', 'running') AND id <> %s
        RETURNING id, org_id, agent_id, status = 'cancelled' AS ended, """
    + notify_if_watched()
    + """
    ), notified AS ("""
    + outbox.execution_fanout("changed", "'execution.cancelled'", where="changed.ended")
    + """)
    SELECT id FROM changed
"""
)


def refuse_over_limit(
    conn: Connection, spec: VersionSpec, new: list[tuple[uuid.UUID, Any]]
) -> None:
    """Before new executions (id, input) of `spec` go in, under the flow lock: under
    on_limit `reject`, refuse them all (409) when one would find its key full."""
    concurrency = spec.concurrency
    if concurrency is None or concurrency.get("on_limit") != "reject":
        return
    pg = driver(conn)
    for key, count in Counter(spec.flow_key(payload) for _, payload in new).items():
        (active,) = pg.execute(_GROUP_COUNT, (spec.agent_id, key)).fetchone()
        if active + count > concurrency["limit"]:
            raise Conflict(
                f"agent {spec.agent_name!r} has {active} executions of concurrency key {key} "
                f"running or waiting; its concurrency.limit is {concurrency['limit']} and "
                "on_limit is reject",
                hint="submit again once one of them has finished",
            )


def supersede(
    conn: Connection, spec: VersionSpec, new: list[tuple[uuid.UUID, Any]]
) -> list[uuid.UUID]:
    """Once new executions (id, input) of `spec` are in, under the flow lock: under on_limit
    `cancel_running`, the newest of each key cancels the key's others, the new ones before it
    included (latest wins); the ids it ended or asked to stop."""
    concurrency = spec.concurrency
    if concurrency is None or concurrency.get("on_limit") != "cancel_running":
        return []
    pg = driver(conn)
    superseded: list[uuid.UUID] = []
    newest = {spec.flow_key(payload): execution_id for execution_id, payload in new}
    for key, newer in newest.items():
        error = error_body("superseded", f"superseded by execution {newer}")
        rows = pg.execute(_SUPERSEDE, (Jsonb(error), spec.agent_id, key, newer)).fetchall()
        superseded.extend(row[0] for row in rows)
    return superseded


# ---------------------------------------------------------------------------------------------
# Release: what the limits let out now, under the organization's flow lock

# Held rows in the order they are let out: priority, then each group's turn, then age. Each
# concurrency and rate-limit group shows its first GROUP_LOOKAHEAD rows, so a deep backlog of
# one blocked group hides no other group's executions.
_HELD = """
    SELECT id, agent_id, version_id, flow_key, rate_key, priority, waiting_for
    FROM (
        SELECT id, agent_id, version_id, flow_key, rate_key, priority, waiting_for, queued_at,
               row_number() OVER (PARTITION BY agent_id, flow_key, rate_key
                                  ORDER BY priority DESC, queued_at, id) AS turn
        FROM executions
        WHERE org_id = %s AND status = 'queued' AND waiting_for <> 'queue'
    ) held
    WHERE turn <= %s
    ORDER BY priority DESC, turn, queued_at, id
"""
# Rows taking a slot: running, or let out to run.
_ORG_ACTIVE = """
    SELECT count(*) FROM executions
    WHERE org_id = %s AND gated AND status IN ('queued', 'running')
      AND waiting_for IS NULL
"""
_GROUPS_ACTIVE = """
    SELECT agent_id, flow_key, count(*) FROM executions
    WHERE agent_id = ANY(%s) AND flow_key IS NOT NULL AND status IN ('queued', 'running')
      AND waiting_for IS NULL
    GROUP BY agent_id, flow_key
"""
# Starts within the window, earlier attempts' included (execution_attempts: a retry's claim
# overwrites started_at), and rows let out but not started yet, which start within it too. One
# statement, one snapshot: a claim that commits meanwhile is counted once, as started or not.
_RATE_USED = """
    SELECT rate_key, sum(starts) FROM (
        SELECT e.rate_key,
               -- The current attempt's start; a queued row's last start is an attempt's now.
               (CASE WHEN e.status <> 'queued' THEN 1 ELSE 0 END)
               + (SELECT count(*) FROM execution_attempts a
                  WHERE a.execution_id = e.id AND (a.attempt < e.attempt OR e.status = 'queued')
                    AND a.started_at > now() - make_interval(secs => %(period)s)) AS starts
        FROM executions e
        WHERE e.agent_id = %(agent_id)s AND e.rate_key = ANY(%(keys)s)
          AND e.started_at > now() - make_interval(secs => %(period)s)
        UNION ALL
        SELECT e.rate_key, 1 FROM executions e
        WHERE e.org_id = %(org_id)s AND e.agent_id = %(agent_id)s AND e.rate_key = ANY(%(keys)s)
          AND e.status = 'queued' AND e.waiting_for IS NULL
    ) counted
    GROUP BY rate_key
"""
_LET_OUT = """
    UPDATE executions SET waiting_for = NULL, dispatched_at = now()
    WHERE id = ANY(%s) AND status = 'queued' AND waiting_for IS NOT NULL
    RETURNING id, version_id, priority
"""
_SAY_WHY = """
    UPDATE executions e SET waiting_for = why.reason
    FROM unnest(%s::uuid[], %s::text[]) AS why(id, reason)
    WHERE e.id = why.id AND e.status = 'queued' AND e.waiting_for IS DISTINCT FROM why.reason
      AND e.waiting_for IS NOT NULL
"""

# Held rows of one group looked at per release: it lets out at most this many of a group, and
# the next release (a finish, a cancel, the flow tick) goes on.
GROUP_LOOKAHEAD = 256


@dataclass
class Released:
    let_out: list[LetOut] = field(default_factory=list)
    # Why each row looked at still waits.
    reasons: dict[uuid.UUID, str] = field(default_factory=dict)


class _Room:
    """What the organization's limits leave free, counted down as rows are let out."""

    def __init__(self, pg: psycopg.Connection, org_id: uuid.UUID, org_free: int | None, held):
        self._pg = pg
        self.org_free = org_free  # None: no max_running
        agents = list({row.agent_id for row in held if row.flow_key is not None})
        self.groups: Counter = Counter()
        if agents:
            for agent_id, key, count in pg.execute(_GROUPS_ACTIVE, (agents,)):
                self.groups[(agent_id, key)] = count
        self.rates: Counter = Counter()
        self._rate_groups_read: set[uuid.UUID] = set()
        self._org_id = org_id
        self._held = held

    def _read_rates(self, spec: VersionSpec) -> None:
        if spec.agent_id in self._rate_groups_read:
            return
        self._rate_groups_read.add(spec.agent_id)
        keys = list({row.rate_key for row in self._held if row.agent_id == spec.agent_id})
        params = {
            "agent_id": spec.agent_id,
            "org_id": self._org_id,
            "keys": keys,
            "period": float(spec.rate_limit["period_seconds"]),
        }
        for key, count in self._pg.execute(_RATE_USED, params):
            self.rates[(spec.agent_id, key)] += count

    def blocked_by(self, row, spec: VersionSpec) -> str | None:
        if self.org_free is not None and self.org_free <= 0:
            return "org_max_running"
        concurrency = spec.concurrency
        if (
            concurrency is not None
            and row.flow_key is not None
            and self.groups[(row.agent_id, row.flow_key)] >= concurrency["limit"]
        ):
            return "agent_concurrency"
        if spec.rate_limit is not None and row.rate_key is not None:
            self._read_rates(spec)
            if self.rates[(row.agent_id, row.rate_key)] >= spec.rate_limit["limit"]:
                return "agent_rate_limit"
        return None

    def take(self, row) -> None:
        if self.org_free is not None:
            self.org_free -= 1
        if row.flow_key is not None:
            self.groups[(row.agent_id, row.flow_key)] += 1
        if row.rate_key is not None:
            self.rates[(row.agent_id, row.rate_key)] += 1


def release(conn: Connection, org_id: uuid.UUID) -> Released:
    """Let out the organization's held executions its limits allow now, in the caller's
    transaction, which must hold the flow lock (`lock`). Publish them after it commits."""
    pg = driver(conn)
    result = Released()
    max_running = cache.get(conn, org_id).max_running
    org_free = None
    if max_running is not None:
        (active,) = pg.execute(_ORG_ACTIVE, (org_id,)).fetchone()
        org_free = max_running - active
        if org_free <= 0:
            return result  # full: nothing can start, and what waits says so already
    held = pg.execute(_HELD, (org_id, GROUP_LOOKAHEAD)).fetchall()
    if not held:
        return result
    held = [_Held(*row) for row in held]
    room = _Room(pg, org_id, org_free, held)
    chosen: list[uuid.UUID] = []
    for row in held:
        if room.org_free is not None and room.org_free <= 0:
            break  # the organization is full: nothing further can start
        spec = specs.get(conn, row.version_id)
        reason = room.blocked_by(row, spec)
        if reason is None:
            room.take(row)
            chosen.append(row.id)
        elif reason != row.waiting_for:
            result.reasons[row.id] = reason
    if chosen:
        turn = {execution_id: place for place, execution_id in enumerate(chosen)}
        let_out = [LetOut(*out) for out in pg.execute(_LET_OUT, (chosen,)).fetchall()]
        # Published in the order chosen, they are taken in that order.
        result.let_out = sorted(let_out, key=lambda out: turn[out.execution_id])
    if result.reasons:
        pg.execute(_SAY_WHY, (list(result.reasons), list(result.reasons.values())))
    return result


@dataclass(frozen=True)
class _Held:
    id: uuid.UUID
    agent_id: uuid.UUID
    version_id: uuid.UUID
    flow_key: str | None
    rate_key: str | None
    priority: int
    waiting_for: str


def publish(conn: Connection, let_out: Iterable[LetOut]) -> None:
    """Publish executions a claim or a release let out, once their transaction has committed
    (they carry their dispatch stamp: one the broker missed is found by the sweeper)."""
    batch = [
        Dispatch(out.execution_id, specs.get(conn, out.version_id), out.priority) for out in let_out
    ]
    if batch:
        dispatch.publish_many(batch)


def publish_after_commit(let_out: list[LetOut]) -> None:
    if let_out:
        db.after_commit(publish_now, let_out)


def publish_now(let_out: list[LetOut]) -> None:
    """`publish` on a connection of its own, for callers past their transaction."""
    if let_out:
        with db.hot() as conn:
            publish(conn, let_out)


def released_in_transaction(conn: Connection, org_id: uuid.UUID) -> Released:
    """Take the flow lock and release, in a transaction of its own on `conn` (a savepoint when
    `conn` is in one already)."""
    with driver(conn).transaction():
        lock(conn, org_id)
        return release(conn, org_id)


# ---------------------------------------------------------------------------------------------
# Beat's flow tick

# The organizations holding executions back: a skip scan of each index of held rows, one probe
# per organization, however deep the backlogs.
_SKIP_SCAN_ORGS = """
    WITH RECURSIVE orgs(org_id) AS (
        (SELECT org_id FROM executions
         WHERE status = 'queued' AND {held} ORDER BY org_id LIMIT 1)
        UNION ALL
        SELECT (SELECT e.org_id FROM executions e
                WHERE e.status = 'queued' AND e.{held} AND e.org_id > orgs.org_id
                ORDER BY e.org_id LIMIT 1)
        FROM orgs WHERE orgs.org_id IS NOT NULL
    )
    SELECT org_id FROM orgs WHERE org_id IS NOT NULL
"""
_ORGS_HOLDING = (
    "("
    + _SKIP_SCAN_ORGS.format(held="waiting_for = 'queue'")
    + ") UNION ("
    + _SKIP_SCAN_ORGS.format(held="waiting_for <> 'queue'")
    + ")"
)
# Fair windows with room and executions held back for them (after a crash, or a claim that
# found the next row locked).
_WINDOW_TOP_UP = """
    WITH room AS (
        SELECT h.queue, %s::int - (
            SELECT count(*) FROM (
                SELECT 1 FROM executions u
                WHERE u.org_id = %s AND u.queue = h.queue AND u.status = 'queued'
                  AND u.waiting_for IS NULL
                LIMIT %s::int) w) AS free
        FROM (
            -- The queues it holds executions back on: a skip scan, as for the organizations.
            WITH RECURSIVE queues(queue) AS (
                (SELECT queue FROM executions
                 WHERE org_id = %s AND status = 'queued' AND waiting_for = 'queue'
                 ORDER BY queue LIMIT 1)
                UNION ALL
                SELECT (SELECT e.queue FROM executions e
                        WHERE e.org_id = %s AND e.status = 'queued'
                          AND e.waiting_for = 'queue' AND e.queue > queues.queue
                        ORDER BY e.queue LIMIT 1)
                FROM queues WHERE queues.queue IS NOT NULL
            )
            SELECT queue FROM queues WHERE queue IS NOT NULL
        ) h
    ), chosen AS (
        SELECT e.id FROM room,
        LATERAL (SELECT id FROM executions
                 WHERE org_id = %s AND queue = room.queue AND status = 'queued'
                   AND waiting_for = 'queue'
                 ORDER BY priority DESC, queued_at LIMIT greatest(room.free, 0)) e
    )
    UPDATE executions SET waiting_for = NULL, dispatched_at = now()
    WHERE id IN (SELECT id FROM chosen) AND status = 'queued' AND waiting_for = 'queue'
    RETURNING id, version_id, priority, queued_at
"""


def flow_tick() -> int:
    """Release what each organization holding executions may start now, and top up its fair
    windows; how many were let out. Organizations whose flow lock is taken are left to the
    transaction holding it."""
    with db.hot() as conn:
        orgs = [row[0] for row in driver(conn).execute(_ORGS_HOLDING).fetchall()]
    total = 0
    for org_id in orgs:
        try:
            total += _tick_org(org_id)
        except Exception:
            # One organization's trouble (a timeout on a huge backlog, say) must not stop the
            # tick for the organizations after it: the next tick tries it again.
            log.warning("flow tick: releasing organization %s failed", org_id, exc_info=True)
    return total


def _tick_org(org_id: uuid.UUID) -> int:
    with db.begin() as conn:
        pg = driver(conn)
        (locked,) = pg.execute(_TRY_LOCK, (_lock_key(org_id),)).fetchone()
        if not locked:
            return 0
        let_out = release(conn, org_id).let_out
        window = current_config().fair_window * cache.get(conn, org_id).weight
        if window > 0:
            params = (window, org_id, window, org_id, org_id, org_id)
            rows = pg.execute(_WINDOW_TOP_UP, params).fetchall()
            rows.sort(key=lambda row: (-row[2], row[3]))  # priority, then age
            let_out += [LetOut(*row[:3]) for row in rows]
        else:
            let_out += [LetOut(*row) for row in pg.execute(_WINDOW_OFF, (org_id,))]
    publish_now(let_out)
    return len(let_out)


# RUNYARD_FAIR_WINDOW set to 0 after rows were held back for the window: let them all out.
_WINDOW_OFF = """
    UPDATE executions SET waiting_for = NULL, dispatched_at = now()
    WHERE org_id = %s AND status = 'queued' AND waiting_for = 'queue'
    RETURNING id, version_id, priority
"""
