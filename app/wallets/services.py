"""Agents' wallets: made by the wallet service (app/wallets/engine.py) and stored, one per
agent. Nothing is stored when the service fails."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.agents import services as agents
from app.audit import services as audit
from app.errors import Conflict, NotFound
from app.orgs.services import Principal
from app.wallets import engine
from app.wallets.models import AgentWallet
from app.wallets.tokens import access_token

_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")


def present(wallet: AgentWallet) -> dict[str, Any]:
    return {
        "address": wallet.address,
        "label": wallet.label,
        "provider": wallet.provider,
        "created_at": wallet.created_at,
    }


def create(session: Session, principal: Principal, ref: str, label: str | None) -> AgentWallet:
    """Ask the wallet service for a wallet and store it as the agent's: 409 when it has one,
    WalletServiceFailed (502) when the service fails."""
    principal.require("wallets:write")
    agent = agents.resolve(session, principal, ref)
    if agent.archived_at is not None:
        raise Conflict(f"agent {agent.name!r} is archived", hint="archived agents cannot change")
    # Two requests at once would both make a wallet at the service: one at a time per agent
    # (held across the call, which RUNYARD_WALLET_ENGINE_TIMEOUT_SECONDS bounds).
    session.execute(_LOCK, {"key": f"runyard:wallet-create:{agent.id}"})
    if session.get(AgentWallet, agent.id) is not None:
        raise Conflict(
            f"agent {agent.name!r} has a wallet already",
            hint=f"GET /api/v1/agents/{agent.name}/wallet shows it; an agent has one wallet",
        )
    label = label if label is not None else f"runyard {principal.org_name}/{agent.name}"
    token = access_token(session.connection(), principal.org_id)
    address = engine.create_wallet(label, token=token)
    wallet = AgentWallet(
        agent_id=agent.id,
        org_id=principal.org_id,
        address=address,
        label=label,
        provider="engine",
        **audit.created_by(principal),
    )
    session.add(wallet)
    session.flush()
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change(
            "wallet.create",
            "agent",
            agent.id,
            agent.name,
            [{"op": "add", "path": "/wallet", "value": {"address": address, "label": label}}],
        ),
    )
    return wallet


def get(session: Session, principal: Principal, ref: str) -> AgentWallet:
    agent = agents.resolve(session, principal, ref)
    wallet = session.get(AgentWallet, agent.id)
    if wallet is None:
        raise NotFound(
            f"agent {agent.name!r} has no wallet",
            hint=f"POST /api/v1/agents/{agent.name}/wallet (admin) makes one",
        )
    return wallet
