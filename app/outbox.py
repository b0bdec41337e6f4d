"""The notifications' outbox: events written by the statement or transaction that changes the
state, so a committed change always has its events (app/notifications delivers them).

Every writer joins its changed rows to the organization's subscriptions (`fanout`): an
organization without any pays one probe of an empty range of ix_notifications_org_id and
writes nothing. The rows name their subject (an execution, a chain execution, a schedule); the
deliverer builds `data`, the object as the API shows it, at the first attempt.

After its commit a writer hands the new event ids to `publish`, which asks a worker to deliver
them now; beat also delivers whatever is due (workers/maintenance.py), so a message that is
lost only delays a delivery.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection, text

from app import broker
from app.db import db

log = logging.getLogger(__name__)

# How often a subscription hears of the same exceeded quota at most: a client retrying after
# each 429 must not turn into a flood of deliveries.
QUOTA_EVENT_EVERY_SECONDS = 60


def fanout(
    source: str,
    *,
    org: str,
    event_type: str,
    subject: str,
    agent: str = "NULL::uuid",
    data: str = "NULL::jsonb",
    where: str = "TRUE",
) -> str:
    """An INSERT ... SELECT writing one event per matching subscription for each row of
    `source` (a CTE's name); the arguments are SQL expressions over it. It returns the ids
    written. A subscription's filter.agents narrows the events that name an `agent`."""
    return f"""
        INSERT INTO notification_events (org_id, notification_id, type, subject_id, data)
        SELECT {org}, n.id, {event_type}, {subject}, {data}
        FROM {source} JOIN notifications n ON n.org_id = {org}
        WHERE {event_type} = ANY(n.events)
          AND (n.agent_ids IS NULL OR {agent} IS NULL OR {agent} = ANY(n.agent_ids))
          AND {where}
        RETURNING id
    """


def execution_fanout(source: str, event_type: str, where: str = "TRUE") -> str:
    """`fanout` for the rows of `source` that are executions (a CTE returning their id, org_id
    and agent_id): the events of an execution, narrowed by its agent."""
    return fanout(
        source,
        org=f"{source}.org_id",
        event_type=event_type,
        subject=f"{source}.id",
        agent=f"{source}.agent_id",
        where=where,
    )


# A chain execution that reached succeeded or failed (app/chains/progress.py).
_CHAIN_ENDED = text(
    "WITH ended AS (SELECT id, org_id, status FROM chain_executions "
    "WHERE id = :id AND status IN ('succeeded', 'failed')) "
    + fanout("ended", org="ended.org_id", event_type="'chain.' || ended.status", subject="ended.id")
)

# Schedules that paused (by themselves after failed fires, or through the API).
_SCHEDULES_PAUSED = text(
    "WITH paused AS (SELECT id, org_id FROM schedules WHERE id = ANY(:ids)) "
    + fanout("paused", org="paused.org_id", event_type="'schedule.paused'", subject="paused.id")
)

_QUOTA_EXCEEDED = text(
    "WITH refused AS (SELECT CAST(:org_id AS uuid) AS org_id) "
    + fanout(
        "refused",
        org="refused.org_id",
        event_type="'quota.exceeded'",
        subject="NULL::uuid",
        data=":data",
        where=f"""NOT EXISTS (
            SELECT 1 FROM notification_events e
            WHERE e.notification_id = n.id AND e.type = 'quota.exceeded'
              AND e.data ->> 'limit' = :limit
              AND e.created_at > now() - interval '{QUOTA_EVENT_EVERY_SECONDS} seconds')""",
    )
)


def chain_ended(conn: Connection, chain_execution_id: uuid.UUID) -> list[uuid.UUID]:
    """In the transaction that ended the chain execution: its event, if it ended."""
    return list(conn.execute(_CHAIN_ENDED, {"id": chain_execution_id}).scalars())


def schedules_paused(conn: Connection, schedule_ids: Iterable[uuid.UUID]) -> list[uuid.UUID]:
    """In the transaction that paused these schedules: their events."""
    ids = list(schedule_ids)
    if not ids:
        return []
    return list(conn.execute(_SCHEDULES_PAUSED, {"ids": ids}).scalars())


def quota_exceeded(org_id: uuid.UUID, body: dict[str, Any]) -> None:
    """A submit was refused with a 429. Nothing of the submit is stored, but its event is: in
    a transaction of its own, committed whatever becomes of the request's, then published."""
    params = {"org_id": org_id, "limit": body["limit"], "data": Jsonb(body)}
    try:
        if db.bound_for_tests:
            with db.begin() as conn:
                ids = list(conn.execute(_QUOTA_EXCEEDED, params).scalars())
        else:
            with db.engine.begin() as conn:
                ids = list(conn.execute(_QUOTA_EXCEEDED, params).scalars())
    except Exception:
        # The 429 is the answer that matters: an event that cannot be written must not turn
        # it into a 500.
        log.exception("quota.exceeded event of %s not written", org_id)
        return
    publish(ids)


def publish(event_ids: list[uuid.UUID]) -> None:
    """After the commit that wrote them: ask a worker to deliver these events now. A broker
    that cannot be reached only delays them until beat finds them due."""
    if not event_ids:
        return
    try:
        broker.send_notifications(event_ids)
    except Exception:
        log.warning("%d notification events left for beat: broker unreachable", len(event_ids))
