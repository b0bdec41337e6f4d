"""The catalog: public agents of every organization, listed for all and run by any.

A run through the catalog is the caller's execution (its organization's quotas, limits, logs,
notifications and reads); the agent stays its owner's, who sees how often the catalog runs it
(`catalog_runs`) and nothing of the runs themselves. An agent made private or archived is a 404
to the others at once: the execution's insert checks it (app/executions/entries.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.agents import services as agents
from app.agents.lookup import CatalogRef
from app.agents.models import Agent, AgentVersion
from app.db import page
from app.executions import services as executions
from app.executions.spec import DEFAULT_PRIORITY
from app.orgs.models import Organization
from app.orgs.services import Principal


def list_public(
    session: Session,
    principal: Principal,
    *,
    q: str | None,
    capability: str | None,
    offset: int,
    limit: int,
) -> tuple[list[dict[str, Any]], int]:
    """Public, live agents of every organization, newest first (any role may read it)."""
    query = agents.searched(
        select(Agent).where(Agent.visibility == "public", Agent.archived_at.is_(None)), q
    )
    if capability:
        query = query.where(Agent.capabilities.contains([capability]))
    items, total = page(
        session, query, Agent.created_at.desc(), Agent.id.desc(), offset=offset, limit=limit
    )
    versions = {
        version.id: version
        for version in session.scalars(
            select(AgentVersion).where(AgentVersion.id.in_([a.current_version_id for a in items]))
        )
    }
    owners = dict(
        session.execute(
            select(Organization.id, Organization.name).where(
                Organization.id.in_({a.org_id for a in items})
            )
        ).all()
    )
    return [_entry(agent, versions[agent.current_version_id], owners) for agent in items], total


def _entry(agent: Agent, version: AgentVersion, owners: dict) -> dict[str, Any]:
    return {
        "org": owners[agent.org_id],
        "name": agent.name,
        "description": agent.description,
        "input_schema": version.input_schema,
        "output_schema": version.output_schema,
        "current_version": agent.current_version,
        "capabilities": agent.capabilities,
    }


def owner_elsewhere(session: Session, principal: Principal, agent_id: Any) -> str | None:
    """The name of the organization that owns the agent, when it is not the caller's (the
    execution was a run through the catalog); else None."""
    owner = session.execute(
        select(Organization.id, Organization.name)
        .join(Agent, Agent.org_id == Organization.id)
        .where(Agent.id == agent_id)
    ).first()
    return None if owner is None or owner.id == principal.org_id else owner.name


def run(
    principal: Principal,
    org: str,
    agent: str,
    payload: dict[str, Any],
    *,
    version: str | None = None,
    priority: int = DEFAULT_PRIORITY,
    traceparent: str | None = None,
    documents: list[Any] | None = None,
) -> dict[str, Any]:
    """Run another organization's public agent as the caller's own execution (handed the
    caller's `documents`)."""
    return executions.submit(
        principal,
        CatalogRef(org=org, name=agent),
        payload,
        version=version,
        priority=priority,
        traceparent=traceparent,
        documents=documents,
    )
