"""Reading and setting an organization's limits, and what it uses of them."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from app.audit import services as audit
from app.errors import NotFound, ValidationFailed
from app.flow import quotas
from app.flow.limits import NAMES, OrgLimits, cache, read
from app.orgs.models import Organization
from app.orgs.services import Principal, get_org_by_name

# What `runyard orgs limits` sets: every limit of OrgLimits. None removes a limit; the weight is
# never unset (every organization has a share), so none is refused for it.
SETTABLE = (
    "max_running",
    "max_queued",
    "submit_rate",
    "submit_burst",
    "cpu_seconds_per_day",
    "weight",
    "retention_days",
)
_WHOLE = {"max_running", "max_queued", "submit_burst", "weight", "retention_days"}
# PostgreSQL's integer, the columns' type.
_LARGEST_WHOLE = 2**31 - 1
# organizations' check constraint "weight BETWEEN 1 AND 1000".
WEIGHT_RANGE = (1, 1000)

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
        "queues": _queues(conn, principal),
    }


def queues(session: Session, principal: Principal) -> list[dict[str, Any]]:
    """Per queue, the organization's queued executions and the age of the oldest (seconds)."""
    principal.require("read")
    return _queues(session.connection(), principal)


def _queues(conn: Connection, principal: Principal) -> list[dict[str, Any]]:
    return [dict(row) for row in conn.execute(_QUEUES, {"org_id": principal.org_id}).mappings()]


def set_limits(session: Session, org_name: str, changes: dict[str, float | None]) -> OrgLimits:
    """Set the given limits (None removes one) of an organization; its limits after. An admin
    command (`runyard orgs limits`): audited as the OS user that ran it."""
    org = get_org_by_name(session, org_name)
    if org is None:
        raise NotFound(f"no organization {org_name!r}", hint="runyard orgs create NAME")
    before = limits_of(org).as_dict()
    for name, value in changes.items():
        if name not in SETTABLE:
            raise ValidationFailed(f"{name} cannot be set", errors={name: [f"one of {SETTABLE}"]})
        setattr(org, name, _checked(name, value))
    session.flush()
    cache.forget(org.id)
    after = limits_of(org)
    audit.record(
        session,
        audit.Actor.cli(org.id),
        audit.Change(
            "org.limits", "org", org.id, org.name, audit.changes_between(before, after.as_dict())
        ),
    )
    return after


def limits_of(org: Organization) -> OrgLimits:
    return OrgLimits(**{name: getattr(org, name) for name in NAMES})


def _checked(name: str, value: float | None) -> float | None:
    if name == "weight":
        return _checked_weight(value)
    if value is None:
        return None
    whole = name in _WHOLE
    largest = _LARGEST_WHOLE if whole else math.inf
    # NaN passes `<= 0` and PostgreSQL's `> 0` alike; infinity is no limit: both are refused.
    if not math.isfinite(value) or value <= 0 or value > largest or (whole and value != int(value)):
        kind = "a whole number" if whole else "a number"
        bound = f" up to {_LARGEST_WHOLE}" if whole else ""
        raise ValidationFailed(
            f"{name} must be {kind} above 0{bound}, or none to remove it",
            errors={name: [f"{kind} above 0{bound}, or none"]},
        )
    return int(value) if whole else value


def _checked_weight(value: float | None) -> int:
    low, high = WEIGHT_RANGE
    if value is None:
        raise ValidationFailed(
            "weight cannot be removed: every organization has a share of the workers",
            errors={"weight": [f"a whole number from {low} to {high}"]},
            hint=f"--weight {low} gives it the default share",
        )
    if not math.isfinite(value) or value != int(value) or not low <= value <= high:
        raise ValidationFailed(
            f"weight must be a whole number from {low} to {high}",
            errors={"weight": [f"a whole number from {low} to {high}"]},
            hint=f"an organization of weight 2 starts twice as many executions as one of weight "
            f"{low} when both have work waiting on a busy queue",
        )
    return int(value)
