"""Reading and setting an organization's limits, and what it uses of them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.errors import NotFound, ValidationFailed
from app.flow import quotas
from app.flow.limits import NAMES, OrgLimits, cache, read
from app.orgs.models import Organization
from app.orgs.services import Principal, get_org_by_name

# The limits `runyard orgs limits` sets today; max_running and weight belong to the dispatch
# that starts executions in turn, which does not read them yet.
SETTABLE = ("max_queued", "submit_rate", "submit_burst", "cpu_seconds_per_day")
_WHOLE = {"max_queued", "submit_burst"}

# `queued` as max_queued counts it: executions, and chain runs whose first step has not started.
_COUNTS = text(
    """
    SELECT count(*) FILTER (WHERE status = 'running') AS running,
           count(*) FILTER (WHERE status = 'queued')
           + (SELECT count(*) FROM chain_executions
              WHERE org_id = :org_id AND status = 'queued') AS queued
    FROM executions WHERE org_id = :org_id AND status IN ('queued', 'running')
    """
)
_QUEUES = text(
    """
    SELECT v.queue, count(*) AS queued,
           extract(epoch FROM now() - min(e.queued_at))::float8 AS oldest_queued_age_seconds
    FROM executions e JOIN agent_versions v ON v.id = e.version_id
    WHERE e.org_id = :org_id AND e.status = 'queued'
    GROUP BY v.queue ORDER BY v.queue
    """
)


def usage(session: Session, principal: Principal) -> dict[str, Any]:
    """The organization's limits, what it uses of them now, and its queues."""
    principal.require("read")
    conn = session.connection()
    params = {"org_id": principal.org_id}
    counts = conn.execute(_COUNTS, params).one()
    return {
        "limits": read(conn, principal.org_id).as_dict(),
        "usage": {
            "running": counts.running,
            "queued": counts.queued,
            "cpu_seconds_today": round(quotas.used_today(conn, principal.org_id), 3),
        },
        "queues": [dict(row) for row in conn.execute(_QUEUES, params).mappings()],
    }


def set_limits(session: Session, org_name: str, changes: dict[str, float | None]) -> OrgLimits:
    """Set the given limits (None removes one) of an organization; its limits after."""
    org = get_org_by_name(session, org_name)
    if org is None:
        raise NotFound(f"no organization {org_name!r}", hint="runyard orgs create NAME")
    for name, value in changes.items():
        if name not in SETTABLE:
            raise ValidationFailed(f"{name} cannot be set", errors={name: [f"one of {SETTABLE}"]})
        setattr(org, name, _checked(name, value))
    session.flush()
    cache.forget(org.id)
    return limits_of(org)


def limits_of(org: Organization) -> OrgLimits:
    return OrgLimits(**{name: getattr(org, name) for name in NAMES})


def _checked(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if value <= 0 or (name in _WHOLE and value != int(value)):
        kind = "a whole number" if name in _WHOLE else "a number"
        raise ValidationFailed(
            f"{name} must be {kind} above 0, or none to remove it",
            errors={name: [f"{kind} above 0, or none"]},
        )
    return int(value) if name in _WHOLE else value
