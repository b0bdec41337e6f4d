"""Chain plans, cached per process (chain versions never change), and the ids of step rows."""

from __future__ import annotations

import uuid

from sqlalchemy import Connection, text

from app.chains import definitions
from app.chains.definitions import Plan
from app.executions.versions import ImmutableCache

STEP_NAMESPACE = uuid.UUID("6f1d4c1e-8a51-4f55-9d0e-2c6a4e1b7a90")


def step_execution_id(chain_execution_id: uuid.UUID, stage: int, index: int) -> uuid.UUID:
    """The id of a step's execution row: the same for every message that could start it."""
    return uuid.uuid5(STEP_NAMESPACE, f"{chain_execution_id}:{stage}:{index}")


def _load_plan(conn: Connection, version_id: uuid.UUID) -> Plan:
    row = conn.execute(
        text("SELECT steps, on_failure FROM chain_versions WHERE id = :id"), {"id": version_id}
    ).one()
    return definitions.plan_for(row.steps, row.on_failure)


plans: ImmutableCache[Plan] = ImmutableCache(_load_plan, max_entries=512)
