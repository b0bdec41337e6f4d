"""Decisions: the record of each transfer an agent asked for, as the API shows it, read and
listed per organization, and answered by an admin when it awaits approval.

An answer (approve: `queued`; reject: `rejected`) is one transaction: the decision's new
status, its audit event, and the internal event `runyard.decision` {"decision_id", "status"},
sent by the same path as POST /api/v1/events, which resumes the execution waiting for it with
ctx.wait_for_event("runyard.decision", match={"decision_id": ...}).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session

from app.agents.wallet_policy import shown
from app.audit import services as audit
from app.db import page
from app.errors import Conflict, NotFound
from app.events import services as events
from app.orgs.services import Principal
from app.wallets.models import Decision as DecisionRow

EVENT = "runyard.decision"
LIST_HINT = "GET /api/v1/decisions lists your organization's decisions"


@dataclasses.dataclass(frozen=True)
class Decision:
    """A decision as the API shows it (`amount` a decimal string, `agent` its name)."""

    id: uuid.UUID
    agent: str
    execution_id: uuid.UUID | None
    kind: str
    chain: str
    to: str
    amount: str
    currency: str
    reason: str | None
    policy_check: dict[str, Any]
    status: str
    queue_id: str | None
    transaction_hash: str | None
    # Why it was refused, rejected or errored.
    error: str | None
    approved_by: dict[str, Any] | None
    created_at: dt.datetime
    updated_at: dt.datetime

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The columns Decision is made of, in its order (`decided` makes one from a row of them).
COLUMNS = (
    "id, agent_name, execution_id, kind, chain, to_address, amount, currency, reason, "
    "policy_check, status, queue_id, transaction_hash, error, approved_by, created_at, "
    "updated_at"
)


def decided(row: Any) -> Decision:
    values = list(row)
    values[6] = shown(Decimal(values[6]))
    return Decision(*values)


def present(row: DecisionRow) -> dict[str, Any]:
    return decided(
        [
            row.id,
            row.agent_name,
            row.execution_id,
            row.kind,
            row.chain,
            row.to,
            row.amount,
            row.currency,
            row.reason,
            row.policy_check,
            row.status,
            row.queue_id,
            row.transaction_hash,
            row.error,
            row.approved_by,
            row.created_at,
            row.updated_at,
        ]
    ).as_dict()


def list_decisions(
    session: Session,
    principal: Principal,
    *,
    agent: str | None = None,
    execution_id: uuid.UUID | None = None,
    status: str | None = None,
    offset: int,
    limit: int,
) -> tuple[list[DecisionRow], int]:
    """Newest first; `agent` by name or id."""
    query = select(DecisionRow).where(DecisionRow.org_id == principal.org_id)
    if agent is not None:
        try:
            query = query.where(
                or_(DecisionRow.agent_id == uuid.UUID(agent), DecisionRow.agent_name == agent)
            )
        except ValueError:
            query = query.where(DecisionRow.agent_name == agent)
    if execution_id is not None:
        query = query.where(DecisionRow.execution_id == execution_id)
    if status is not None:
        query = query.where(DecisionRow.status == status)
    return page(
        session,
        query,
        DecisionRow.created_at.desc(),
        DecisionRow.id.desc(),
        offset=offset,
        limit=limit,
    )


def _id(ref: str | uuid.UUID) -> uuid.UUID:
    try:
        return ref if isinstance(ref, uuid.UUID) else uuid.UUID(ref)
    except ValueError:
        raise NotFound(f"no decision {str(ref)[:80]!r}", hint=LIST_HINT) from None


def get(session: Session, principal: Principal, ref: str | uuid.UUID) -> DecisionRow:
    decision_id = _id(ref)
    found = session.scalar(
        select(DecisionRow).where(
            DecisionRow.id == decision_id, DecisionRow.org_id == principal.org_id
        )
    )
    if found is None:
        raise NotFound(f"no decision {decision_id}", hint=LIST_HINT)
    return found


_LOCKED = text(
    f"""
    SELECT {COLUMNS}, (SELECT status FROM executions e WHERE e.id = d.execution_id) AS run
    FROM decisions d WHERE id = :id AND org_id = :org_id FOR UPDATE
    """
)
_ANSWER = text(
    f"""
    UPDATE decisions SET status = :status, approved_by = CAST(:by AS jsonb), error = :error,
                         updated_at = now()
    WHERE id = :id RETURNING {COLUMNS}
    """
)
# An execution in one of these may still send an approved transfer.
UNFINISHED = ("queued", "running", "waiting")


def answer(session: Session, principal: Principal, ref: str | uuid.UUID, approve: bool) -> Decision:
    """Approve (status `queued`) or reject (`rejected`) a decision awaiting approval, and wake
    the execution waiting for the answer (commits, then publishes it); 409 for any other
    decision."""
    principal.require("decisions:answer")
    decision_id = _id(ref)
    conn = session.connection()
    row = conn.execute(_LOCKED, {"id": decision_id, "org_id": principal.org_id}).first()
    if row is None:
        raise NotFound(f"no decision {decision_id}", hint=LIST_HINT)
    current = decided(row[:-1])
    if current.status != "awaiting_approval":
        raise Conflict(
            f"decision {decision_id} is {current.status}, not awaiting approval",
            hint="only a decision awaiting approval is approved or rejected, once",
        )
    if approve and row.run not in UNFINISHED:
        raise Conflict(
            f"the execution of decision {decision_id} has ended: nothing would send it",
            hint="reject it instead (or leave it); run the agent again for a new decision",
        )
    status = "queued" if approve else "rejected"
    by = {"token_id": str(principal.token_id), "token_name": principal.token_name}
    updated = conn.execute(
        _ANSWER,
        {
            "id": decision_id,
            "status": status,
            "by": json.dumps(by),
            "error": None if approve else f"rejected by {principal.token_name}",
        },
    ).one()
    audit.record(
        conn,
        audit.Actor.of(principal),
        audit.Change(
            "decision.approve" if approve else "decision.reject",
            "decision",
            decision_id,
            current.agent,
            [{"op": "replace", "path": "/status", "value": status}],
        ),
    )
    emitted = events.emit(
        conn,
        principal.org_id,
        EVENT,
        {"decision_id": str(decision_id), "status": status},
        {"token_id": principal.token_id, "token_name": principal.token_name},
    )
    session.commit()
    emitted.publish_after_commit()
    return decided(updated)
