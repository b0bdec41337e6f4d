"""A trigger's target, checked and built for one run: shared by webhook deliveries
(services.deliver) and event triggers (on_event.fire_for_event)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection

from app import runs
from app.errors import ValidationFailed


def launch_for(
    conn: Connection,
    org_id: uuid.UUID,
    *,
    agent_id: uuid.UUID | None,
    chain_id: uuid.UUID | None,
    version_id: uuid.UUID | None,
    target_version: str | None,
    payload: Any,
    run_id: uuid.UUID,
) -> runs.Launch | runs.ChainLaunch:
    """The run to start with this input: 422 for an input the target's input_schema refuses,
    409 for an archived target (as for a submit)."""
    if chain_id is not None:
        return runs.chain_launch(conn, org_id, chain_id, target_version, payload, run_id)
    assert agent_id is not None, "a trigger targets an agent or a chain"
    spec = runs.spec_for(conn, agent_id, version_id)
    errors = spec.input_errors(payload)
    if errors:
        raise ValidationFailed(
            "the rendered input does not match the agent's input_schema",
            errors=errors,
            hint=f"GET /api/v1/agents/{spec.agent_name} shows the input_schema",
        )
    return runs.Launch(run_id, org_id, spec, payload)
