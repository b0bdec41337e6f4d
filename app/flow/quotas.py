"""Quotas, checked when work is submitted: `submit_rate` (with `submit_burst`), `max_queued` and
`cpu_seconds_per_day`. A refused submit stores nothing and answers 429 with Retry-After; a batch
larger than max_queued, which can never fit, is a 422.

An organization with none of them set pays one dictionary lookup per submit (the limits are
cached per process) and its insert stays one autocommit statement. With `max_queued` set, the
count and the insert run in one transaction holding the organization's admission lock, so two
submits cannot both take the last place.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, text

from app import broker, outbox
from app.db import db
from app.errors import QuotaExceeded, ValidationFailed
from app.flow.limits import OrgLimits, TtlCache, cache

log = logging.getLogger(__name__)

# Retry-After of a max_queued refusal: the queue drains at the workers' pace, unknown here.
MAX_QUEUED_RETRY_SECONDS = 5

_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")
# Not yet started: queued executions, and chain runs whose first step has no row yet.
_QUEUED = text(
    """
    SELECT (SELECT count(*) FROM executions WHERE org_id = :org_id AND status = 'queued')
         + (SELECT count(*) FROM chain_executions WHERE org_id = :org_id AND status = 'queued')
    """
)
_CPU_TODAY = text(
    """
    SELECT coalesce(sum((resource_usage ->> 'cpu_seconds')::float8), 0) FROM executions
    WHERE org_id = :org_id AND finished_at IS NOT NULL
      AND finished_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    """
)


@contextmanager
def admitted(org_id: uuid.UUID, *, executions: int) -> Iterator[Connection]:
    """A connection to insert `executions` new executions of one API submit on, once the
    organization's quotas admit them (else QuotaExceeded). The insert must run inside the
    block."""
    with db.hot() as conn:
        limits = cache.get(conn, org_id)
        if not limits.quotas:
            yield conn
            return
    with db.begin() as conn:
        admit(conn, org_id, executions=executions)
        yield conn


def admit(conn: Connection, org_id: uuid.UUID, *, executions: int) -> None:
    """Admit one API submit of `executions` new executions in the caller's transaction, which
    must insert them before it commits (else QuotaExceeded). The submit takes a token of the
    submit rate only once the other quotas let it through: a client retrying after a
    max_queued refusal does not drain its rate."""
    limits = cache.get(conn, org_id)
    if not limits.quotas:
        return
    try:
        _refuse(conn, org_id, limits, executions)
    except QuotaExceeded as refused:
        # Nothing of the submit is stored, but the refusal is: a quota.exceeded notification,
        # committed on its own (app/outbox.py), at most once a minute per subscription.
        outbox.quota_exceeded(
            org_id,
            {
                "limit": refused.limit,
                "message": refused.message,
                "retry_after": refused.retry_after,
            },
        )
        raise


def _refuse(conn: Connection, org_id: uuid.UUID, limits: OrgLimits, executions: int) -> None:
    _refuse_over_cpu(conn, org_id, limits)
    if limits.max_queued is not None:
        if executions > limits.max_queued:
            raise ValidationFailed(
                f"{executions} executions can never fit under the organization's max_queued "
                f"of {limits.max_queued}",
                errors={"/items": [f"at most {limits.max_queued} items"]},
                hint="split the batch",
            )
        queued = queued_now(conn, org_id)
        if queued + executions > limits.max_queued:
            raise QuotaExceeded(
                "max_queued",
                f"the organization has {queued} executions not yet started; {executions} more "
                f"would pass its max_queued of {limits.max_queued}",
                retry_after=MAX_QUEUED_RETRY_SECONDS,
                hint="submit again once some have started; GET /api/v1/usage shows the queues",
            )
    _take_submit_token(org_id, limits)


def queued_now(conn: Connection, org_id: uuid.UUID) -> int:
    """The organization's executions not yet started, under its admission lock: held until the
    caller's transaction ends, so two admissions cannot both take the last place."""
    conn.execute(_LOCK, {"key": f"runyard:admission:{org_id}"})
    return conn.execute(_QUEUED, {"org_id": org_id}).scalar_one()


def _refuse_over_cpu(conn: Connection, org_id: uuid.UUID, limits: OrgLimits) -> None:
    if limits.cpu_seconds_per_day is None:
        return
    used = cpu_today.get(conn, org_id)
    if used >= limits.cpu_seconds_per_day:
        raise QuotaExceeded(
            "cpu_seconds_per_day",
            f"the organization's executions used {used:.1f} s of CPU today (UTC), its "
            f"cpu_seconds_per_day is {limits.cpu_seconds_per_day:g}",
            retry_after=_seconds_to_midnight_utc(),
            hint="submits are taken again at 00:00 UTC; running executions finish; GET "
            "/api/v1/usage shows the figures",
        )


class Room:
    """What the quotas leave each organization for the runs of one of beat's batches (schedule
    fires: the submit rate is the API's). Read once per organization, in organization order
    (two beats taking admission locks in different orders would deadlock), then counted down
    as the batch admits runs. Build it in the transaction that inserts them."""

    def __init__(self, conn: Connection, org_ids: Iterable[uuid.UUID]) -> None:
        self._refused: dict[uuid.UUID, str] = {}
        self._places: dict[uuid.UUID, int] = {}
        for org_id in sorted(set(org_ids)):
            limits = cache.get(conn, org_id)
            if not limits.quotas:
                continue
            try:
                _refuse_over_cpu(conn, org_id, limits)
            except QuotaExceeded as exc:
                self._refused[org_id] = exc.limit
                continue
            if limits.max_queued is not None:
                self._places[org_id] = limits.max_queued - queued_now(conn, org_id)

    def refusal(self, org_id: uuid.UUID) -> str | None:
        """The quota that refuses one more run of the organization now, or None."""
        if org_id in self._refused:
            return self._refused[org_id]
        if self._places.get(org_id, 1) < 1:
            return "max_queued"
        return None

    def take(self, org_id: uuid.UUID) -> None:
        """One run of the organization was admitted."""
        if org_id in self._places:
            self._places[org_id] -= 1


def _take_submit_token(org_id: uuid.UUID, limits: OrgLimits) -> None:
    if limits.submit_rate is None:
        return
    rate, burst = limits.submit_rate, limits.burst
    try:
        bucket = broker.take_tokens(f"submit:{org_id}", rate, burst)
    except broker.BrokerError:
        # As a submit is taken while the broker is away, so is one the bucket cannot count.
        log.warning("submit rate of %s not counted: Redis cannot be reached", org_id)
        return
    if bucket.taken:
        return
    retry_after = max(1, math.ceil((1 - bucket.tokens) / rate))
    raise QuotaExceeded(
        "submit_rate",
        f"the organization submits over its submit_rate of {rate:g} a second (bursts of {burst})",
        retry_after=retry_after,
        hint=f"wait {retry_after} s (Retry-After), or send many inputs in one batch "
        "(POST /api/v1/agents/{ref}/executions/batch counts once)",
        **{
            "RateLimit-Limit": str(burst),
            "RateLimit-Remaining": str(math.floor(bucket.tokens)),
            "RateLimit-Reset": str(math.ceil((burst - bucket.tokens) / rate)),
        },
    )


def _seconds_to_midnight_utc() -> int:
    now = dt.datetime.now(dt.UTC)
    midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - now).total_seconds()))


def used_today(conn: Connection, org_id: uuid.UUID) -> float:
    """CPU seconds the organization's executions used since 00:00 UTC."""
    return float(conn.execute(_CPU_TODAY, {"org_id": org_id}).scalar_one())


# Summing a day's executions on every submit would cost more than the submit.
cpu_today: TtlCache[float] = TtlCache(used_today)
