"""Recovery, run by beat: nothing accepted is lost.

The sweeper requeues (and publishes) or fails executions whose lease ran out, publishes rows
committed but never published, publishes every queued row again after the broker lost its data
or restarted, and gives back messages a dead worker took but never claimed. Kept apart from
the hot path. The broker's side (kombu's Redis keys, the sweeper's marker) is app/broker's,
the SQL is app/executions/leases.py's; what a swept chain step means for its chain is the
caller's (`ChainHooks`, given by workers/maintenance.py): executions know nothing of chains.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from app import broker
from app.broker import BrokerWatch
from app.config import current_config
from app.db import DATABASE_ERRORS, db
from app.executions import leases
from app.executions.dispatch import Dispatch, publish_many, stamp_dispatched
from app.executions.versions import specs

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    republished: int = 0
    requeued: int = 0
    lost: int = 0
    # Set when the broker lost its data (or, Redis, restarted) since the last sweep.
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


@dataclass(frozen=True)
class ChainHooks:
    """What the layer that knows chains does for the sweeper: move on the chains of steps a
    sweep ended (no worker records those ends), and resume chains after the broker lost their
    step messages (app/chains/progress.py: move_on, resume_stalled)."""

    move_on: Callable[[list[uuid.UUID]], None]
    resume_stalled: Callable[..., list[uuid.UUID]]


SWEEP_BATCH = 500
# A sweep that died holding the lock frees it this long after its budget.
LOCK_MARGIN_SECONDS = 10.0
RECOVERY_START = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def sweep(budget_seconds: float | None = None, *, chains: ChainHooks | None = None) -> SweepReport:
    """Requeue or fail executions whose lease ran out; publish again what the broker may not
    hold: every row still queued after the broker lost its data (see BrokerWatch), and rows
    committed but never published. Batches of SWEEP_BATCH, one LPUSH per queue and priority,
    until done or the budget (by default one sweep interval) is spent: the next sweep goes on.
    Without `chains`, the chains of swept steps wait for the chains' own resume check."""
    cfg = current_config()
    budget = max(1.0, cfg.sweep_interval_seconds if budget_seconds is None else budget_seconds)
    deadline = time.monotonic() + budget
    report = SweepReport()
    watch = BrokerWatch.for_broker(cfg.broker_url, cfg.redis_url)
    ended_steps = _end_expired_leases(report, watch)
    try:
        with watch.exclusive(budget + LOCK_MARGIN_SECONDS) if watch else _no_lock() as held:
            if not held:
                report.skipped = True
            else:
                if watch is not None:
                    _recover_from_broker_reset(
                        watch, report, deadline, cfg.chain_stall_seconds, chains
                    )
                    # RabbitMQ gives a dead consumer's messages back by itself: nothing
                    # stranded in a worker to give back there.
                    if watch.reads_messages:
                        _restore_stranded(report, cfg.dispatch_grace_seconds)
                    _republish_vanished(
                        report, cfg.dispatch_grace_seconds, retries=watch.reads_messages
                    )
                _republish_undispatched(report, deadline, cfg.dispatch_grace_seconds)
    except broker.BrokerError:
        # Nothing can be published without the broker; the rows wait, safe, for the next sweep.
        log.warning("sweeper: the broker cannot be reached; publishing waits", exc_info=True)
    # No worker records these ends: their chains move on from here.
    if chains is not None and ended_steps:
        chains.move_on(ended_steps)
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
        report.leases_extended = leases.extend_running(conn, current_config().lease_seconds)
    log.warning(
        "sweeper: the database is back (unreachable since %.0fs ago at least): %d running "
        "leases extended by a lease for their workers to renew; none expired in this sweep",
        time.time() - outage_since,
        report.leases_extended,
    )


def _expire_leases(report: SweepReport) -> list[uuid.UUID]:
    with db.hot() as conn:
        requeued = leases.requeue_expired(conn)
        report.requeued = len(requeued)
        # Not left to the undispatched pass: its grace counts from queued_at, the submit time.
        requeued_dispatches = _dispatches(conn, [row for row in requeued if not row.waiting_for])
        lost = leases.fail_expired(conn)
    report.lost = len(lost)
    # On a broker outage nothing is sent: the rows stay unstamped for the undispatched pass.
    sent = publish_many(requeued_dispatches)
    stamp_dispatched(sent)
    report.republished += len(sent)
    return [row.chain_execution_id for row in lost if row.chain_execution_id]


def _dispatches(conn, rows) -> list[Dispatch]:
    return [Dispatch(row.id, specs.get(conn, row.version_id), row.priority) for row in rows]


def _republish_undispatched(report: SweepReport, deadline: float, grace: float) -> None:
    while time.monotonic() < deadline:
        with db.hot() as conn:
            rows = leases.undispatched(conn, grace, SWEEP_BATCH)
            batch = _dispatches(conn, rows)
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
    process: giving those back early costs a duplicate at most, which the claim drops."""

    def still_queued(execution_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        with db.hot() as conn:
            return leases.still_queued(conn, execution_ids)

    report.restored = broker.restore_taken(
        still_queued, cutoff=time.time() - grace_seconds, page_size=STRANDED_PAGE
    )
    if report.restored:
        log.warning(
            "sweeper: %d messages taken by workers but never claimed went back to their queues",
            report.restored,
        )


# Queued rows published at least a dispatch grace ago are looked for in the broker, at most
# SWEEP_BATCH per sweep; a queue holding more messages than this is not read through.
VANISHED_SCAN_LIMIT = 20_000


def _republish_vanished(report: SweepReport, grace_seconds: float, *, retries: bool) -> None:
    """Publish again a queued row whose message is nowhere in the broker.

    Rows let out by a gate (or a durable wake-up) are stamped in the transaction that lets them
    out and published once it commits: a process killed in between, or a publish that failed
    because the broker was down, leaves a row `queued` and stamped with no message. On Redis
    besides, kombu takes a message in two steps (BRPOP from the queue, then HSET into `unacked`)
    and a worker killed between the two takes it out of Redis for good. So the rows published
    at least a dispatch grace ago and still queued are looked for in their queues (and in
    `unacked` on Redis); those found nowhere are published again. A duplicate (one taken in that
    same window by a live worker) is dropped by the claim.

    Without `retries` (RabbitMQ, whose consumers' unacknowledged messages cannot be read) rows
    already attempted are left out, but for resumed durable runs (no countdown on theirs): a
    retry's countdown message sits in a live worker until due, and publishing it again would
    start the retry before its backoff."""
    with db.hot() as conn:
        rows = leases.stale_queued(conn, grace_seconds, SWEEP_BATCH, retries=retries)
        if not rows:
            return
        waiting = _dispatches(conn, rows)
    # A backlog deeper than the scan limit is left unread: its messages are read another time.
    present, unread = broker.message_ids_held(
        {item.spec.queue for item in waiting}, VANISHED_SCAN_LIMIT
    )
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


def _recover_from_broker_reset(
    watch: BrokerWatch,
    report: SweepReport,
    deadline: float,
    chain_stall_seconds: float,
    chains: ChainHooks | None = None,
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
            state["horizon"] = leases.database_now(conn).isoformat()
            state["after"] = [RECOVERY_START.isoformat(), str(uuid.UUID(int=0))]
            state["published_all"] = False
            watch.save(state)
        horizon = dt.datetime.fromisoformat(state["horizon"])
        while not state["published_all"] and time.monotonic() < deadline:
            after_queued_at, after_id = state["after"]
            rows = leases.queued_since_reset(
                conn,
                horizon,
                dt.datetime.fromisoformat(after_queued_at),
                uuid.UUID(after_id),
                SWEEP_BATCH,
            )
            sent = publish_many(_dispatches(conn, rows))
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
        if chains is not None:
            report.chains_resumed = len(
                chains.resume_stalled(grace_seconds=0, checked_before=horizon)
            )
    elif state["published_all"]:
        watch.forget_recovery()


@contextlib.contextmanager
def _no_lock() -> Iterator[bool]:
    yield True


class DatabaseOutages:
    """Since when the sweeper has found the database unreachable, until a sweep reaches it.

    Kept in BrokerWatch's Redis (the broker's, or REDIS_URL's with RabbitMQ): every beat shares
    it (a sweep that failed in one is known to the next, wherever it runs) and a beat restarted
    after the outage still knows. Kept in this process's memory as well, for other brokers and
    for a Redis that cannot be reached: a sweeper running in one process (beat) needs nothing
    more. Either one saying "away" is enough: an extension too many costs the attempts
    of dead workers one lease of delay, an extension missed costs healthy attempts their outcome.

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
            watch.note_database_away(now)

    def since(self, watch: BrokerWatch | None) -> float | None:
        known = [self._since] if self._since is not None else []
        if watch is not None:
            stored = watch.database_away_since()
            if stored is not None:
                known.append(stored)
        return min(known, default=None)

    def forget(self, watch: BrokerWatch | None) -> None:
        self._since = None
        if watch is not None:
            watch.forget_database_away()


outages = DatabaseOutages()
