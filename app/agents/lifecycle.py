"""An agent's versions over time: rollback to an earlier one, and the diff of two."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app import versiondiff
from app.agents import capabilities, services, wallet_policy
from app.agents.models import Agent, AgentVersion
from app.audit import services as audit
from app.errors import Conflict
from app.orgs.services import Principal
from app.versioning import find_version, make_current


def rollback(session: Session, principal: Principal, ref: str, version: str) -> Agent:
    """Make an existing version current again; no version is made.

    Nothing cached needs forgetting: version rows are immutable (the workers' spec cache is
    keyed by version id), and a submit's cached (agent, version) target is re-checked by its
    INSERT against `agents.current_version_id`, so a stale one is looked up again."""
    principal.require("agents:write")
    agent = services.resolve(session, principal, ref)
    if agent.archived_at is not None:
        raise Conflict(f"agent {agent.name!r} is archived", hint="archived agents cannot change")
    row = find_version(session, AgentVersion.agent_id, agent, version, "agent")
    if row.wallet_policy != services.current_version(session, agent).wallet_policy:
        wallet_policy.require_admin(principal)
    before = services.audited_state(session, agent)
    make_current(agent, row)
    # Copied from the current version for the capability filter (app/agents/models.py).
    agent.capabilities = capabilities.names(row.capabilities)
    session.flush()
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change(
            "agent.rollback",
            "agent",
            agent.id,
            agent.name,
            audit.changes_between(before, services.audited_state(session, agent)),
        ),
    )
    return agent


def _definition(row: AgentVersion, role: str) -> dict[str, Any]:
    """What a diff compares: the versioned fields, masked for `role` as every answer is."""
    shown = services.present_version(row, role)
    return {field: shown[field] for field in services.VERSIONED_FIELDS}


def diff(
    session: Session, principal: Principal, ref: str, version: str, against: str | None
) -> dict[str, Any]:
    """From version `against` (default: the current one) to `version`: the RFC 6902
    operations and the breaking changes among them."""
    agent = services.resolve(session, principal, ref)
    new = find_version(session, AgentVersion.agent_id, agent, version, "agent")
    old = find_version(
        session, AgentVersion.agent_id, agent, against or agent.current_version, "agent"
    )
    before, after = _definition(old, principal.role), _definition(new, principal.role)
    return {
        "from": old.version,
        "to": new.version,
        "changes": versiondiff.changes(before, after),
        "breaking": versiondiff.agent_breaks(before, after),
    }
