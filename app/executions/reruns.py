"""Reruns: run a finished execution again, one (POST /executions/{id}/rerun) or every one a
filter matches (POST /executions/rerun).

A rerun is a submit: it enters through the same functions as POST /agents/{ref}/executions
and its batch (app/executions/services.py), so quotas, concurrency, rate limits, fairness,
the archived-agent refusal and the input check apply unchanged. The only difference is the new
row's `rerun_of`, which names the execution it reruns.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.agents.lookup import CatalogRef
from app.agents.models import Agent
from app.audit import services as audit
from app.db import driver
from app.errors import Conflict, ValidationFailed
from app.executions import entries, gates, services
from app.executions.models import Execution
from app.flow import quotas
from app.orgs.services import Principal

SAME, CURRENT = "same", "current"
DEFAULT_MAX = 1000


def _end_read(session: Session) -> None:
    """End the read's transaction before the submit inserts: in a keyed request the session is
    a savepoint of the request's transaction, and the insert must not land inside it (the
    session's close rolls it back)."""
    session.commit()


def _version_for(version: str, original_version: str) -> str | None:
    """What a submit pins: the original's version, none (the agent's current one), or `x.y.z`
    (a version the agent lacks answers 404 as a pinned submit does)."""
    if version == SAME:
        return original_version
    if version == CURRENT:
        return None
    return version


def rerun(
    session: Session,
    principal: Principal,
    execution_id: str,
    *,
    payload: dict[str, Any] | None = None,
    version: str = SAME,
    traceparent: str | None = None,
) -> dict[str, Any]:
    """Submit a finished execution again: its input (or `payload`), its version (or the
    current one, or `x.y.z`), its priority. 409 while it has not finished."""
    principal.require("executions:submit")
    original = services.get(session, principal, execution_id)
    if original.status in ("queued", "running", "waiting"):
        raise Conflict(
            f"execution {original.id} has not finished ({original.status}); only a finished "
            "execution is rerun",
            hint=f"wait for it to end, or POST /api/v1/executions/{original.id}/cancel first",
        )
    # Another organization's agent was run through the catalog, and is run through it again
    # (a 404 once it is private or archived).
    owner = session.scalar(select(Agent.org_id).where(Agent.id == original.agent_id))
    ref = (
        str(original.agent_id)
        if owner == principal.org_id
        else CatalogRef(agent_id=original.agent_id)
    )
    _end_read(session)
    # By id: an agent renamed since is still found. An archived agent answers 409 (the submit's
    # own refusal); a deleted agent took its executions with it, so the original is a 404.
    return services.submit(
        principal,
        ref,
        original.input if payload is None else payload,
        version=_version_for(version, original.agent_version),
        priority=original.priority,
        rerun_of=original.id,
        traceparent=traceparent,
    )


@dataclass(frozen=True)
class Filter:
    agent: str | None = None
    status: list[str] | None = None
    error_type: str | None = None
    finished_after: dt.datetime | None = None
    finished_before: dt.datetime | None = None


def _agent_ids(principal: Principal, agent: str) -> Any:
    """An agent named by id or by name (as the list's `agent` filter): a name matches no row
    rather than answering 404, so a dry run over a renamed agent reads 0."""
    try:
        return [uuid.UUID(agent)]
    except ValueError:
        return select(Agent.id).where(Agent.org_id == principal.org_id, Agent.name == agent)


def _matching(principal: Principal, where: Filter):
    """Finished executions of the caller's organization that the filter matches. Chain steps
    are left out: a step is rerun with its chain (POST /chain-executions/{id}/rerun); so are
    runs of other organizations' agents through the catalog: each is rerun on its own (POST
    /executions/{id}/rerun), where the agent's being public is checked."""
    if (
        where.finished_after is not None
        and where.finished_before is not None
        and where.finished_after > where.finished_before
    ):
        raise ValidationFailed(
            "finished_after is later than finished_before: nothing could match",
            errors={"/filter/finished_after": ["later than finished_before"]},
            hint="swap them, or leave one out",
        )
    query = select(Execution).where(
        Execution.org_id == principal.org_id,
        Execution.chain_execution_id.is_(None),
        Execution.finished_at.is_not(None),
        Execution.agent_id.in_(select(Agent.id).where(Agent.org_id == principal.org_id)),
    )
    if where.agent:
        query = query.where(Execution.agent_id.in_(_agent_ids(principal, where.agent)))
    if where.status:
        query = query.where(Execution.status.in_(where.status))
    if where.error_type:
        query = query.where(Execution.error["type"].astext == where.error_type)
    if where.finished_after:
        query = query.where(Execution.finished_at >= where.finished_after)
    if where.finished_before:
        query = query.where(Execution.finished_at < where.finished_before)
    return query


def rerun_matching(
    session: Session,
    principal: Principal,
    where: Filter,
    *,
    version: str = SAME,
    dry_run: bool = False,
    limit: int = DEFAULT_MAX,
    traceparent: str | None = None,
) -> dict[str, Any]:
    """Rerun the finished executions a filter matches: `matched` counts them all, the `limit`
    that finished first are rerun (`ids`, in that order). All in one transaction, admitted by
    the organization's quotas as one batch (past max_queued: 429, nothing stored)."""
    principal.require("executions:submit")
    query = _matching(principal, where)
    matched = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    if dry_run:
        return {"matched": matched}
    originals = session.scalars(
        query.order_by(Execution.finished_at, Execution.id).limit(limit)
    ).all()
    if not originals:
        return {"matched": matched, "ids": []}
    _end_read(session)
    groups: dict[tuple[uuid.UUID, str | None], list[tuple[int, entries.BatchRow]]] = {}
    for position, original in enumerate(originals):
        key = (original.agent_id, _version_for(version, original.agent_version))
        row = entries.BatchRow(uuid.uuid4(), original.priority, original.input, original.id)
        groups.setdefault(key, []).append((position, row))
    released = gates.Released()
    stored = []
    # One transaction over every agent version's batch: all are stored or none.
    with (
        quotas.admitted(principal.org_id, executions=len(originals)) as conn,
        driver(conn).transaction(),
    ):
        for (agent_id, pinned), members in groups.items():
            rows = [row for _, row in members]
            stored.append(
                services.store_batch(
                    conn,
                    principal,
                    str(agent_id),
                    pinned,
                    rows,
                    released,
                    pointer=_pointer_by_original(rows),
                    traceparent=traceparent,
                )
            )
        reruns = {
            str(row.id): str(row.rerun_of) for members in groups.values() for _, row in members
        }
        audit.record(
            conn,
            audit.Actor.of(principal),
            audit.Change(
                "execution.rerun_bulk",
                "execution",
                None,
                None,
                [{"op": "add", "path": "/reruns", "value": reruns}],
            ),
        )
    services.publish_batches(stored, released)
    ids: list[uuid.UUID | None] = [None] * len(originals)
    for members in groups.values():
        for position, row in members:
            ids[position] = row.id
    return {"matched": matched, "ids": ids}


def _pointer_by_original(rows: list[entries.BatchRow]):
    """An input the chosen version refuses is named by the execution it came from."""
    return lambda index: f"/executions/{rows[index].rerun_of}/input"


def describe_filter(data: Mapping[str, Any]) -> Filter:
    return Filter(
        agent=data.get("agent"),
        status=data.get("status"),
        error_type=data.get("error_type"),
        finished_after=data.get("finished_after"),
        finished_before=data.get("finished_before"),
    )
