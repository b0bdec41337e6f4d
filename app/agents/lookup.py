"""Finding an agent to run and one of its versions, on the caller's connection: for submits
(app/executions) and for the targets of schedules and triggers (app/runs.py), each of which
answers a miss in its own words (a submit's 404 and 409, a target's 422 by pointer)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection, text

_AGENT_SQL = (
    "SELECT id, name, current_version_id, archived_at FROM agents WHERE org_id = :org_id AND "
)
_BY_ID = text(_AGENT_SQL + "id = :ref")
_BY_NAME = text(_AGENT_SQL + "name = :ref")
_VERSION = text("SELECT id FROM agent_versions WHERE agent_id = :agent_id AND version = :version")


def find_agent(conn: Connection, org_id: uuid.UUID, ref: str, *, by_id: bool) -> Any:
    """The agent's row (id, name, current_version_id, archived_at) or None. With `by_id`, a
    reference that reads as a UUID is looked up as an id, anything else as a name."""
    if by_id:
        try:
            return (
                conn.execute(_BY_ID, {"org_id": org_id, "ref": uuid.UUID(ref)}).mappings().first()
            )
        except ValueError:
            pass
    return conn.execute(_BY_NAME, {"org_id": org_id, "ref": ref}).mappings().first()


def find_version_id(conn: Connection, agent_id: uuid.UUID, version: str) -> uuid.UUID | None:
    return conn.execute(_VERSION, {"agent_id": agent_id, "version": version}).scalar()
