"""Assignment by capability and load: POST /api/v1/executions runs an input on whichever of the
organization's agents has the capability (with the provider and chain asked for) and accepts
the input, the least loaded first.

Load is the agent's executions `queued` and `running`, counted through the organization's
index of executions by status (ix_executions_org_id_status_queued_at), so the count walks the
organization's active executions, not the agent's history. Agents of equal load take turns:
the one whose last execution was queued longest ago goes first (one probe of
ix_executions_org_id_agent_id_queued_at each). Two assignments at the same instant may read the
same loads and pick the same agent: the loads are a guide, not a reservation, and no limit
rests on them (an agent's concurrency limit still holds). An agent whose capability has
authority `observe` is not a candidate when its version holds a wallet_policy: its runs could
move money.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from app.agents import capabilities
from app.db import db
from app.errors import Conflict, ValidationFailed
from app.executions import services
from app.executions.spec import DEFAULT_PRIORITY
from app.executions.versions import specs
from app.orgs.services import Principal

_CANDIDATES_SQL = text(
    """
    SELECT a.id, a.name, a.current_version_id, v.capabilities,
           -- A definition without one stores JSON null.
           coalesce(jsonb_typeof(v.wallet_policy) = 'object', false) AS moves_money,
           (SELECT count(*) FROM executions e
            WHERE e.org_id = a.org_id AND e.status IN ('queued', 'running')
              AND e.agent_id = a.id) AS load,
           (SELECT e.queued_at FROM executions e
            WHERE e.org_id = a.org_id AND e.agent_id = a.id
            ORDER BY e.queued_at DESC LIMIT 1) AS last_queued_at
    FROM agents a
    JOIN agent_versions v ON v.id = a.current_version_id
    WHERE a.org_id = :org_id AND a.archived_at IS NULL
      AND a.capabilities @> ARRAY[CAST(:capability AS text)]
    ORDER BY load, last_queued_at NULLS FIRST, a.name
    """
)


def submit_by_capability(
    principal: Principal,
    capability: str,
    payload: dict[str, Any],
    *,
    provider: str | None = None,
    chain: str | None = None,
    priority: int = DEFAULT_PRIORITY,
    traceparent: str | None = None,
) -> dict[str, Any]:
    """Store and queue one execution on the agent chosen; it carries `assigned_by`."""
    agent, assigned_by = choose(principal, capability, payload, provider=provider, chain=chain)
    return services.submit(
        principal,
        agent,
        payload,
        priority=priority,
        traceparent=traceparent,
        assigned_by=assigned_by,
    )


def choose(
    principal: Principal,
    capability: str,
    payload: dict[str, Any],
    *,
    provider: str | None = None,
    chain: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """(the name of the agent that runs `payload`, the execution's `assigned_by`)."""
    principal.require("executions:submit")
    with db.hot() as conn:
        rows = conn.execute(
            _CANDIDATES_SQL, {"org_id": principal.org_id, "capability": capability}
        ).all()
        offering = [row for row in rows if _may_run(row, capability, provider, chain)]
        if not offering:
            raise Conflict(
                _nobody(capability, provider, chain, had_name=bool(rows)),
                hint="GET /api/v1/agents?capability="
                + capability
                + " lists the agents that have it; a capability object names its providers "
                "and chains",
            )
        refusals: dict[str, Any] = {}
        accepting = []
        for row in offering:
            errors = specs.get(conn, row.current_version_id).input_errors(payload)
            if errors:
                refusals[row.name] = errors
            else:
                accepting.append(row)
    if not accepting:
        raise ValidationFailed(
            f"every agent with the capability {capability!r} refuses the input",
            errors=refusals,
            hint="each agent's input_schema is on GET /api/v1/agents/{name}",
        )
    return accepting[0].name, {
        "capability": capability,
        "candidates": [{"agent": row.name, "load": row.load} for row in accepting],
    }


def _may_run(row: Any, capability: str, provider: str | None, chain: str | None) -> bool:
    """Whether a candidate's capability offers the provider and chain asked for. An agent whose
    capability has authority `observe` is never assigned a run that moves money: one with a
    wallet_policy (its runs may transfer) is left out."""
    found = capabilities.find(row.capabilities, capability)
    if found is None or (found["authority"] == "observe" and row.moves_money):
        return False
    return capabilities.offers(found, provider, chain)


def _nobody(capability: str, provider: str | None, chain: str | None, *, had_name: bool) -> str:
    if not had_name:
        return f"no agent of the organization has the capability {capability!r}"
    wanted = " and ".join(
        f"{kind} {value!r}" for kind, value in (("provider", provider), ("chain", chain)) if value
    )
    return f"no agent with the capability {capability!r} offers {wanted}"
