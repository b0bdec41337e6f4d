"""Chain plans, cached per process (chain versions never change), and the ids of step rows."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict

from sqlalchemy import Connection, text

from app.chains import definitions
from app.chains.definitions import Plan

STEP_NAMESPACE = uuid.UUID("6f1d4c1e-8a51-4f55-9d0e-2c6a4e1b7a90")


def step_execution_id(chain_execution_id: uuid.UUID, stage: int, index: int) -> uuid.UUID:
    """The id of a step's execution row: the same for every message that could start it."""
    return uuid.uuid5(STEP_NAMESPACE, f"{chain_execution_id}:{stage}:{index}")


class PlanCache:
    def __init__(self, max_entries: int = 512) -> None:
        self._entries: OrderedDict[uuid.UUID, Plan] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def get(self, conn: Connection, version_id: uuid.UUID) -> Plan:
        plan = self._entries.get(version_id)
        if plan is None:
            row = conn.execute(
                text("SELECT steps, on_failure FROM chain_versions WHERE id = :id"),
                {"id": version_id},
            ).one()
            plan = definitions.plan_for(row.steps, row.on_failure)
            with self._lock:
                self._entries[version_id] = plan
                if len(self._entries) > self._max:
                    self._entries.popitem(last=False)
        return plan


plans = PlanCache()
