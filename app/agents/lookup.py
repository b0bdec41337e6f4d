"""Finding an agent to run and one of its versions, on the caller's connection: for submits
(app/executions) and for the targets of schedules and triggers (app/runs.py), each of which
answers a miss in its own words (a submit's 404 and 409, a target's 422 by pointer)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

_AGENT_SQL = (
    "SELECT id, name, current_version_id, archived_at FROM agents WHERE org_id = :org_id AND "
)
_BY_ID = text(_AGENT_SQL + "id = :ref")
_BY_NAME = text(_AGENT_SQL + "name = :ref")
# A catalog entry: a live agent of any organization that is public or the caller's own, by
# owner and name or by id.
_PUBLIC_SQL = (
    "SELECT a.id, a.name, a.current_version_id, a.archived_at FROM agents a "
    "JOIN organizations o ON o.id = a.org_id "
    "WHERE (a.visibility = 'public' OR a.org_id = :caller) AND a.archived_at IS NULL AND "
)
_PUBLIC_BY_NAME = text(_PUBLIC_SQL + "o.name = :org AND a.name = :name")
_PUBLIC_BY_ID = text(_PUBLIC_SQL + "a.id = :id")
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


def find_public_agent(conn: Connection, ref: CatalogRef, caller: uuid.UUID) -> Any:
    """A public agent's row as find_agent answers it (or, private, one of the `caller`
    organization's own), or None when there is no such agent, or it is another's private or
    archived one (to other organizations, all three are the same 404)."""
    if ref.agent_id is not None:
        params = {"id": ref.agent_id, "caller": caller}
        return conn.execute(_PUBLIC_BY_ID, params).mappings().first()
    params = {"org": ref.org, "name": ref.name, "caller": caller}
    return conn.execute(_PUBLIC_BY_NAME, params).mappings().first()


@dataclass(frozen=True)
class CatalogRef:
    """An agent run through the catalog: by its organization's name and its own (POST
    /catalog/{org}/{agent}/executions), or by id (a rerun of such a run)."""

    org: str | None = None
    name: str | None = None
    agent_id: uuid.UUID | None = None

    def __str__(self) -> str:
        return f"{self.org}/{self.name}" if self.agent_id is None else str(self.agent_id)


def find_version_id(conn: Connection, agent_id: uuid.UUID, version: str) -> uuid.UUID | None:
    return conn.execute(_VERSION, {"agent_id": agent_id, "version": version}).scalar()
