"""Quotas, checked when work is submitted: `submit_rate` (with `submit_burst`), `max_queued` and
`cpu_seconds_per_day`. A refused submit stores nothing and answers 429 with Retry-After.

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
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, text

from app import broker
from app.db import db
from app.errors import QuotaExceeded
from app.flow.limits import OrgLimits, TtlCache, cache

log = logging.getLogger(__name__)

# Retry-After of a max_queued refusal: the queue drains at the workers' pace, unknown here.
MAX_QUEUED_RETRY_SECONDS = 5

_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")
_QUEUED = text("SELECT count(*) FROM executions WHERE org_id = :org_id AND status = 'queued'")
_CPU_TODAY = text(
    """
    SELECT coalesce(sum((resource_usage ->> 'cpu_seconds')::float8), 0) FROM executions
    WHERE org_id = :org_id AND finished_at IS NOT NULL
      AND finished_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    """
)


@contextmanager
def admitted(org_id: uuid.UUID, *, executions: int, rate: bool = True) -> Iterator[Connection]:
    """A connection to insert `executions` new executions on, once the organization's quotas
    admit them (else QuotaExceeded). With `rate`, the submit takes one token of the submit
    rate (a batch is one submit). The insert must run inside the block."""
    with db.hot() as conn:
        limits = cache.get(conn, org_id)
        if not limits.quotas:
            yield conn
            return
    if rate:
        _take_submit_token(org_id, limits)
    with db.begin() as conn:
        refuse_over_quota(conn, org_id, limits, executions)
        yield conn


def admit(conn: Connection, org_id: uuid.UUID, *, executions: int, rate: bool = True) -> None:
    """`admitted` for work inserted in the caller's transaction, which must insert it before
    it commits (a chain submit, a webhook delivery, a schedule fired by hand)."""
    limits = cache.get(conn, org_id)
    if not limits.quotas:
        return
    if rate:
        _take_submit_token(org_id, limits)
    refuse_over_quota(conn, org_id, limits, executions)


def refused_limit(conn: Connection, org_id: uuid.UUID, executions: int) -> str | None:
    """The quota that refuses `executions` more for the organization now, or None: for work
    that is not an API submit (schedule fires), so the submit rate does not count. Call it in
    the transaction that inserts them."""
    limits = cache.get(conn, org_id)
    if not limits.quotas:
        return None
    try:
        refuse_over_quota(conn, org_id, limits, executions)
    except QuotaExceeded as exc:
        return exc.limit
    return None


def refuse_over_quota(
    conn: Connection, org_id: uuid.UUID, limits: OrgLimits, executions: int
) -> None:
    if limits.cpu_seconds_per_day is not None:
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
    if limits.max_queued is not None:
        conn.execute(_LOCK, {"key": f"runyard:admission:{org_id}"})
        queued = conn.execute(_QUEUED, {"org_id": org_id}).scalar_one()
        if queued + executions > limits.max_queued:
            raise QuotaExceeded(
                "max_queued",
                f"the organization has {queued} executions not yet started; {executions} more "
                f"would pass its max_queued of {limits.max_queued}",
                retry_after=MAX_QUEUED_RETRY_SECONDS,
                hint="submit again once some have started; GET /api/v1/usage shows the queues",
            )


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
