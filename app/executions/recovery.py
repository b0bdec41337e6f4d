"""Recovery, run by beat: nothing accepted is lost.

The sweeper requeues (and publishes) or fails executions whose lease ran out, publishes rows
committed but never published, publishes every queued row again after the broker lost its data
or restarted, and gives back messages a dead worker took but never claimed. Kept apart from
services.py: it knows the broker's internals (kombu's Redis keys), the hot path does not.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from app.config import current_config
from app.db import DATABASE_ERRORS, db
from app.executions.services import (
    RECORD_ATTEMPT,
    RUN_TASK,
    Dispatch,
    error_body,
    move_chains_on,
    publish_many,
    specs,
    stamp_dispatched,
)

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    republished: int = 0
    requeued: int = 0
    lost: int = 0
    # Set when the broker's Redis lost its data or restarted since the last sweep.
    broker_reset: str | None = None
    # Queued rows published again because the broker may have lost their messages.
    recovered: int = 0
    chains_resumed: int = 0
    # Another sweep (a second beat) held the broker lock: this one published nothing.
    skipped: bool = False
    # Messages a worker took but never claimed, given back to their queues (see _restore_stranded).
    restored: int = 0
    # Queued rows whose message was nowhere in the broker, published again (_republish_vanished).
    vanished: int = 0
    # Running leases extended instead of expired, the database being back from an outage.
    leases_extended: int = 0


SWEEP_BATCH = 500

_UNDISPATCHED = text(
    """
    SELECT id, version_id, priority FROM executions
    WHERE status = 'queued' AND dispatched_at IS NULL
      AND queued_at < now() - make_interval(secs => :grace)
    ORDER BY queued_at LIMIT :batch
    """
)

# Every queued row up to the moment the broker's loss was noticed, walked in (queued_at, id)
# order (ix_executions_queued) so a recovery cut short by the time budget goes on from where it
# stopped.
_QUEUED_SINCE_RESET = text(
    """
    SELECT id, version_id, priority, queued_at FROM executions
    WHERE status = 'queued' AND queued_at <= :horizon
      AND (queued_at, id) > (:after_queued_at, :after_id)
    ORDER BY queued_at, id LIMIT :batch
    """
)

_EXPIRED_REQUEUE = text(
    """
    WITH ended AS (
        UPDATE executions e
        SET status = 'queued', lease_until = NULL, dispatched_at = NULL, error = :lost
        FROM agent_versions v
        WHERE v.id = e.version_id
          AND e.status = 'running' AND e.lease_until < now() AND e.attempt < e.max_attempts
          AND e.cancel_requested_at IS NULL
          -- A lost worker may have done part of the work: run it again only where the agent's
          -- retry policy says `lost` is safe to retry.
          AND v.retry -> 'retry_on' ? 'lost'
        RETURNING e.id, e.attempt, e.error, e.worker, e.started_at, e.resource_usage,
                  e.version_id, e.priority
    ), recorded AS (
    """
    + RECORD_ATTEMPT.format(status="'failed'")
    + ") SELECT id, version_id, priority FROM ended"
).bindparams(bindparam("lost", type_=JSONB))

# After an outage: every running attempt gets one lease from now to be renewed by its worker.
_EXTEND_RUNNING_LEASES = text(
    """
    UPDATE executions SET lease_until = now() + make_interval(secs => :lease)
    WHERE status = 'running' AND lease_until < now() + make_interval(secs => :lease)
    """
)

_EXPIRED_LOST = text(
    """
    WITH ended AS (
        UPDATE executions
        SET status = CASE WHEN cancel_requested_at IS NULL THEN 'failed' ELSE 'cancelled' END,
            finished_at = now(), lease_until = NULL,
            error = CASE WHEN cancel_requested_at IS NULL THEN :lost ELSE :cancelled END
        WHERE status = 'running' AND lease_until < now()
        RETURNING id, attempt, status, error, worker, started_at, resource_usage,
                  chain_execution_id
    ), recorded AS (
    """
    + RECORD_ATTEMPT.format(status="status")
    + ") SELECT id, chain_execution_id FROM ended"
).bindparams(bindparam("lost", type_=JSONB), bindparam("cancelled", type_=JSONB))


def sweep(budget_seconds: float | None = None) -> SweepReport:
    """Requeue or fail executions whose lease ran out; publish again what the broker may not
    hold: every row still queued after the broker lost its data (see BrokerWatch), and rows
    committed but never published. Batches of SWEEP_BATCH, one LPUSH per queue and priority,
    until done or the budget (by default one sweep interval) is spent: the next sweep goes on."""
    cfg = current_config()
    budget = max(1.0, cfg.sweep_interval_seconds if budget_seconds is None else budget_seconds)
    deadline = time.monotonic() + budget
    report = SweepReport()
    watch = BrokerWatch.for_broker(cfg.broker_url)
    ended_steps = _end_expired_leases(report, watch)
    try:
        with watch.exclusive(budget + LOCK_MARGIN_SECONDS) if watch else _no_lock() as held:
            if not held:
                report.skipped = True
            else:
                if watch is not None:
                    _recover_from_broker_reset(watch, report, deadline, cfg.chain_stall_seconds)
                    _restore_stranded(report, cfg.dispatch_grace_seconds)
                    _republish_vanished(report, cfg.dispatch_grace_seconds)
                _republish_undispatched(report, deadline, cfg.dispatch_grace_seconds)
    except redis.RedisError:
        # Nothing can be published without the broker; the rows wait, safe, for the next sweep.
        log.warning("sweeper: the broker cannot be reached; publishing waits", exc_info=True)
    # No worker records these ends: their chains move on from here.
    move_chains_on(ended_steps)
    return report


def _end_expired_leases(report: SweepReport, watch: BrokerWatch | None) -> list[uuid.UUID]:
    """Requeue (and publish at once) or fail what lost its worker; the chain executions of the
    steps it failed. Right after the database was away, extend the running leases instead.

    While PostgreSQL is away no worker can renew a lease, and an outage longer than what is left
    of one lets healthy attempts' leases run out by the database's clock: expiring them when it
    answers again would race their workers' renewals, failing finished work `lost` or running it
    a second time beside the first. So a sweep that finds the database unreachable says so
    (DatabaseOutages), and the next sweep that reaches it extends every running lease by one
    lease and expires nothing: living workers renew within a third of it, and only the attempts
    of workers that died meanwhile run out again, one lease later."""
    outage_since = outages.since(watch)
    try:
        if outage_since is not None:
            _extend_running_leases(report, outage_since)
            outages.forget(watch)
            return []
        return _expire_leases(report)
    except DATABASE_ERRORS:
        outages.record(watch)
        raise


def _extend_running_leases(report: SweepReport, outage_since: float) -> None:
    with db.hot() as conn:
        report.leases_extended = conn.execute(
            _EXTEND_RUNNING_LEASES, {"lease": current_config().lease_seconds}
        ).rowcount
    log.warning(
        "sweeper: the database is back (unreachable since %.0fs ago at least): %d running "
        "leases extended by a lease for their workers to renew; none expired in this sweep",
        time.time() - outage_since,
        report.leases_extended,
    )


def _expire_leases(report: SweepReport) -> list[uuid.UUID]:
    with db.hot() as conn:
        requeued = conn.execute(
            _EXPIRED_REQUEUE,
            {"lost": error_body("lost", "the worker's lease expired; attempt requeued")},
        ).all()
        report.requeued = len(requeued)
        # Not left to the undispatched pass: its grace counts from queued_at, the submit time.
        requeued_dispatches = [
            Dispatch(row.id, specs.get(conn, row.version_id), row.priority) for row in requeued
        ]
        lost = conn.execute(
            _EXPIRED_LOST,
            {
                "lost": error_body("lost", "the worker's lease expired on the last attempt"),
                "cancelled": error_body("cancelled", "cancelled while its worker was lost"),
            },
        ).all()
    report.lost = len(lost)
    # On a broker outage nothing is sent: the rows stay unstamped for the undispatched pass.
    sent = publish_many(requeued_dispatches)
    stamp_dispatched(sent)
    report.republished += len(sent)
    return [row.chain_execution_id for row in lost if row.chain_execution_id]


def _republish_undispatched(report: SweepReport, deadline: float, grace: float) -> None:
    while time.monotonic() < deadline:
        with db.hot() as conn:
            rows = conn.execute(_UNDISPATCHED, {"grace": grace, "batch": SWEEP_BATCH}).all()
            batch = [
                Dispatch(row.id, specs.get(conn, row.version_id), row.priority) for row in rows
            ]
        sent = publish_many(batch)
        stamp_dispatched(sent)
        report.republished += len(sent)
        if len(rows) < SWEEP_BATCH or not sent:
            return


# Taken messages are read this many at a time: running executions hold one each, retries
# waiting out their backoff one each.
STRANDED_PAGE = 1000


def _restore_stranded(report: SweepReport, grace_seconds: float) -> None:
    """Give back to its queue every message a worker took whose execution is still `queued` long
    after it was taken (or due, for a retry's countdown message).

    A Redis message a worker has taken sits in kombu's `unacked` hash until acknowledged. When
    the whole worker dies (SIGKILL, a lost host), a message it had taken and not yet claimed (a
    retry waiting out its backoff, or one caught between fetch and claim) would wait there for
    the visibility timeout, hours away, while its row is `queued` and stamped dispatched, so
    nothing else publishes it. A live worker claims what it takes at once (prefetch 1, acks
    late), except countdown messages before they are due and due ones waiting for a free pool
    process: giving those back early costs a duplicate at most, which the claim drops. Restored
    with kombu's own `restore_by_tag` (what the visibility timeout does), one transaction per
    message, so a message is either still held or back in its queue, never both or neither."""
    from workers import app as celery_app

    cutoff = time.time() - grace_seconds
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        client = channel.client
        offset = 0
        while True:
            tags = client.zrangebyscore(
                channel.unacked_index_key, "-inf", cutoff, start=offset, num=STRANDED_PAGE
            )
            if not tags:
                break
            restored = _restore_page(channel, client, tags, cutoff)
            report.restored += restored
            # A restored message leaves the index: the next page starts that much earlier.
            offset += len(tags) - restored
    if report.restored:
        log.warning(
            "sweeper: %d messages taken by workers but never claimed went back to their queues",
            report.restored,
        )


def _restore_page(channel: Any, client: redis.Redis, tags: list[bytes], cutoff: float) -> int:
    held: dict[uuid.UUID, bytes] = {}
    for tag, raw in zip(tags, client.hmget(channel.unacked_key, tags), strict=True):
        if raw is None:
            continue  # acknowledged meanwhile
        headers = json.loads(raw)[0].get("headers") or {}
        if headers.get("task") != RUN_TASK:
            continue  # chain steps: the chains' resume check recovers those
        eta = headers.get("eta")
        if eta and dt.datetime.fromisoformat(eta).timestamp() > cutoff:
            continue
        with contextlib.suppress(KeyError, ValueError, TypeError):
            held[uuid.UUID(headers["id"])] = tag
    if not held:
        return 0
    with db.hot() as conn:
        stranded = conn.execute(
            text("SELECT id FROM executions WHERE id = ANY(:ids) AND status = 'queued'"),
            {"ids": list(held)},
        ).scalars()
        restored = 0
        for execution_id in stranded:
            channel.qos.restore_by_tag(held[execution_id], client=client)
            restored += 1
    return restored


# Queued rows published at least a dispatch grace ago are looked for in the broker, at most
# SWEEP_BATCH per sweep; a queue holding more messages than this is not read through.
VANISHED_SCAN_LIMIT = 20_000

_STALE_QUEUED = text(
    """
    SELECT id, version_id, priority FROM executions
    WHERE status = 'queued' AND dispatched_at < now() - make_interval(secs => :grace)
    ORDER BY queued_at, id LIMIT :batch
    """
)


def _republish_vanished(report: SweepReport, grace_seconds: float) -> None:
    """Publish again a queued row whose message is nowhere in the broker.

    kombu's Redis transport takes a message in two steps: BRPOP from the queue, then HSET into
    `unacked`. A worker killed between the two (a window of microseconds, hit once in a few
    thousand kills) takes the message out of Redis for good, and its row stays `queued` and
    stamped. So the rows published at least a dispatch grace ago and still queued are looked for
    in their queues and in `unacked`; those found nowhere are published again. A duplicate (one
    taken in that same window by a live worker) is dropped by the claim."""
    from workers import app as celery_app

    with db.hot() as conn:
        rows = conn.execute(_STALE_QUEUED, {"grace": grace_seconds, "batch": SWEEP_BATCH}).all()
        if not rows:
            return
        waiting = [Dispatch(row.id, specs.get(conn, row.version_id), row.priority) for row in rows]
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        client = channel.client
        present = _message_ids(client.hvals(channel.unacked_key))
        unread: set[str] = set()
        for queue in {item.spec.queue for item in waiting}:
            keys = [channel._q_for_pri(queue, step) for step in channel.priority_steps]
            if sum(client.llen(key) for key in keys) > VANISHED_SCAN_LIMIT:
                unread.add(queue)  # a backlog this deep: its messages are read another time
                continue
            for key in keys:
                present |= _message_ids(client.lrange(key, 0, -1), queued=True)
    vanished = [
        item
        for item in waiting
        if item.spec.queue not in unread and str(item.execution_id) not in present
    ]
    sent = publish_many(vanished)
    report.republished += len(sent)
    report.vanished += len(sent)
    if sent:
        log.warning("sweeper: %d queued executions had no message in the broker", len(sent))


def _message_ids(raw_messages: list[bytes], *, queued: bool = False) -> set[str]:
    """Task ids of raw kombu messages: as queued (the message), or as in `unacked` (a list
    holding the message first)."""
    ids = set()
    for raw in raw_messages:
        message = json.loads(raw)
        headers = (message if queued else message[0]).get("headers") or {}
        if "id" in headers:
            ids.add(headers["id"])
    return ids


def _recover_from_broker_reset(
    watch: BrokerWatch, report: SweepReport, deadline: float, chain_stall_seconds: float
) -> None:
    report.broker_reset = watch.check(chains_for_seconds=chain_stall_seconds)
    if report.broker_reset:
        log.warning(
            "sweeper: the broker %s; publishing every queued execution again", report.broker_reset
        )
    state = watch.recovery()
    if state is None:
        return
    with db.hot() as conn:
        if "horizon" not in state:
            # Read after the marker was set: every message lost before that belongs to a row
            # queued before this instant.
            state["horizon"] = conn.execute(text("SELECT now()")).scalar().isoformat()
            state["after"] = [RECOVERY_START.isoformat(), str(uuid.UUID(int=0))]
            state["published_all"] = False
            watch.save(state)
        horizon = dt.datetime.fromisoformat(state["horizon"])
        while not state["published_all"] and time.monotonic() < deadline:
            after_queued_at, after_id = state["after"]
            rows = conn.execute(
                _QUEUED_SINCE_RESET,
                {
                    "horizon": horizon,
                    "after_queued_at": dt.datetime.fromisoformat(after_queued_at),
                    "after_id": uuid.UUID(after_id),
                    "batch": SWEEP_BATCH,
                },
            ).all()
            sent = publish_many(
                [Dispatch(row.id, specs.get(conn, row.version_id), row.priority) for row in rows]
            )
            if rows and not sent:
                return  # the broker went away again: the next sweep goes on from here
            stamp_dispatched(sent)
            report.recovered += len(sent)
            report.republished += len(sent)
            if rows:
                state["after"] = [rows[-1].queued_at.isoformat(), str(rows[-1].id)]
            state["published_all"] = len(rows) < SWEEP_BATCH
            watch.save(state)
    if time.time() < state["chains_until"]:
        # Chain step messages were lost too, and a chord's counter in the result backend: the
        # resume check runs without its stall grace (each chain once) for one stall period, so
        # chains whose steps were running at the reset are looked at as soon as those end.
        from app.chains.services import resume_stalled

        report.chains_resumed = len(resume_stalled(grace_seconds=0, checked_before=horizon))
    elif state["published_all"]:
        watch.forget_recovery()


@contextlib.contextmanager
def _no_lock() -> Iterator[bool]:
    yield True


# Keys the sweeper keeps in the broker's Redis database (see BrokerWatch, DatabaseOutages).
MARKER_KEY = "runyard:broker-marker"
RECOVERY_KEY = "runyard:sweeper:recovery"
LOCK_KEY = "runyard:sweeper:lock"
DATABASE_AWAY_KEY = "runyard:sweeper:database-away-since"
# A sweep that died holding the lock frees it this long after its budget.
LOCK_MARGIN_SECONDS = 10.0
RECOVERY_START = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

# Compare the marker with the server's run_id and, when they differ, set it and open a recovery,
# as one atomic step: of two sweeps (two beats) only one sees the change.
_CHECK_MARKER = """
local old = redis.call('GET', KEYS[1])
if old == ARGV[1] then return old end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return old or ''
"""


class BrokerWatch:
    """Notices that the broker's Redis may have lost messages, and keeps the recovery's place.

    Celery messages exist only in the broker. A Redis flushed, or restarted without its data
    (or whose last second of appendonly writes died with it), drops the messages of rows that
    are `queued` and already stamped `dispatched_at`: nothing else would publish them again. A
    Redis restarted *with* its data strands messages too: those the workers had reserved sit in
    kombu's `unacked` hash until the visibility timeout, hours away (above the longest agent
    timeout).

    So each sweep compares a marker key in the broker's Redis database with the server's
    `run_id` (new at every start of redis-server) and, in the same Lua call, sets it when they
    differ. A missing marker (data lost) or another run_id (a restart) opens a recovery: every
    row queued until that moment is published again, in (queued_at, id) order across as many
    sweeps as it takes, and chains are resumed without their stall grace for the next
    RUNYARD_CHAIN_STALL_SECONDS. Duplicate messages are harmless: the claim takes a queued row
    once and drops the rest (a retry waiting out its backoff may start early).

    - The first sweep ever finds no marker: it cannot tell a new Redis from a flushed one and
      republishes the queued rows once.
    - Two beats: sweeps take turns on a lock in the same Redis, and the compare-and-set is
      atomic, so one recovery opens per reset.
    - Brokers other than `redis://` / `rediss://` are not watched: RabbitMQ keeps persistent
      messages in durable queues across restarts, and gives back unacknowledged ones at once.
    - Running executions are unaffected: their workers finish and record them, and the ack of a
      message the new Redis never held deletes nothing and raises nothing.
    - The marker must not be evicted: a Celery broker needs `maxmemory-policy noeviction`.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @classmethod
    def for_broker(cls, broker_url: str) -> BrokerWatch | None:
        if not broker_url.startswith(("redis://", "rediss://")):
            return None
        return cls(redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5))

    @contextlib.contextmanager
    def exclusive(self, seconds: float) -> Iterator[bool]:
        """Whether this sweep holds the sweepers' lock (free again after `seconds` at most)."""
        lock = self.client.lock(LOCK_KEY, timeout=seconds, blocking=False)
        held = lock.acquire()
        try:
            yield held
        finally:
            if held:
                # Gone already if Redis lost its data meanwhile.
                with contextlib.suppress(redis.exceptions.LockError, redis.RedisError):
                    lock.release()

    def check(self, chains_for_seconds: float) -> str | None:
        """None, or what happened to the broker since the last sweep."""
        run_id = self.client.info("server")["run_id"]
        recovery = json.dumps({"chains_until": time.time() + chains_for_seconds})
        old = self.client.eval(_CHECK_MARKER, 2, MARKER_KEY, RECOVERY_KEY, run_id, recovery)
        old = old.decode() if isinstance(old, bytes) else old
        if old == run_id:
            return None
        if old:
            return "restarted"
        return "lost its data (or this is the first sweep)"

    def recovery(self) -> dict[str, Any] | None:
        raw = self.client.get(RECOVERY_KEY)
        return json.loads(raw) if raw else None

    def save(self, state: dict[str, Any]) -> None:
        self.client.set(RECOVERY_KEY, json.dumps(state))

    def forget_recovery(self) -> None:
        self.client.delete(RECOVERY_KEY)


class DatabaseOutages:
    """Since when the sweeper has found the database unreachable, until a sweep reaches it.

    Kept in the broker's Redis when the broker is Redis: every beat shares it (a sweep that
    failed in one is known to the next, wherever it runs) and a beat restarted after the outage
    still knows. Kept in this process's memory as well, for brokers other than Redis and for a
    Redis that cannot be reached: a sweeper running in one process (beat) needs nothing more.
    Either one saying "away" is enough: an extension too many costs the attempts of dead workers
    one lease of delay, an extension missed costs healthy attempts their outcome.

    Measured from the sweeper's failures rather than from the gap since its last success: the
    gap alone cannot tell an outage from a sweeper that was not running (a beat stopped, a test
    sweeping now and then), and an outage of any length past a sweep interval is seen."""

    def __init__(self) -> None:
        self._since: float | None = None

    def record(self, watch: BrokerWatch | None) -> None:
        now = time.time()
        if self._since is None:
            self._since = now
        if watch is not None:
            with contextlib.suppress(redis.RedisError):
                watch.client.set(DATABASE_AWAY_KEY, now, nx=True)

    def since(self, watch: BrokerWatch | None) -> float | None:
        known = [self._since] if self._since is not None else []
        if watch is not None:
            with contextlib.suppress(redis.RedisError, ValueError):
                stored = watch.client.get(DATABASE_AWAY_KEY)
                if stored is not None:
                    known.append(float(stored))
        return min(known, default=None)

    def forget(self, watch: BrokerWatch | None) -> None:
        self._since = None
        if watch is not None:
            with contextlib.suppress(redis.RedisError):
                watch.client.delete(DATABASE_AWAY_KEY)


outages = DatabaseOutages()
