"""What a submit runs: the agent version a reference names (one of the caller's agents, by id
or name, or another organization's public one through the catalog), cached per process, and
the insert that relies on it (app/executions/services.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from app.agents.lookup import CatalogRef, find_agent, find_public_agent, find_version_id
from app.errors import Conflict, NotFound
from app.executions.spec import VersionSpec
from app.executions.versions import specs
from app.orgs.services import Principal


@dataclass(frozen=True)
class Target:
    agent_id: uuid.UUID
    version_id: uuid.UUID
    pinned: bool


class TargetCache:
    """(org, agent ref, version) -> ids. May be stale: the INSERT re-checks what it relies on."""

    def __init__(self, ttl_seconds: float = 30.0) -> None:
        self.ttl_seconds = ttl_seconds
        self._entries: dict[tuple, tuple[float, Target]] = {}

    def get(self, key: tuple) -> Target | None:
        entry = self._entries.get(key)
        if entry and entry[0] > time.monotonic():
            return entry[1]
        return None

    def put(self, key: tuple, target: Target) -> None:
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self.ttl_seconds, target)

    def forget(self, key: tuple) -> None:
        self._entries.pop(key, None)


targets = TargetCache()


def _lookup_target(
    conn: Connection, principal: Principal, ref: str | CatalogRef, version: str | None
) -> Target:
    if isinstance(ref, CatalogRef):
        row = find_public_agent(conn, ref, principal.org_id)
        if row is None:
            raise NotFound(
                f"no public agent {ref}",
                hint="GET /api/v1/catalog lists the agents every organization may run",
            )
    else:
        row = find_agent(conn, principal.org_id, ref, by_id=True)
        if row is None:
            raise NotFound(f"no agent {ref!r}", hint="GET /api/v1/agents lists your agents")
        if row["archived_at"] is not None:
            raise Conflict(
                f"agent {row['name']!r} is archived and takes no new executions",
                hint="create a new agent, or run another one",
            )
    if version is None:
        return Target(row["id"], row["current_version_id"], pinned=False)
    version_id = find_version_id(conn, row["id"], version)
    if version_id is None:
        where = (
            "GET /api/v1/catalog shows its current_version"
            if isinstance(ref, CatalogRef)
            else f"GET /api/v1/agents/{row['name']}/versions lists them"
        )
        raise NotFound(f"agent {row['name']!r} has no version {version!r}", hint=where)
    return Target(row["id"], version_id, pinned=True)


def insert_for_target(
    conn: Connection,
    principal: Principal,
    ref: str | CatalogRef,
    version: str | None,
    insert: Callable[[Connection, VersionSpec, Target], Any],
) -> tuple[Target, VersionSpec, Any]:
    """Find the agent version a submit runs (the cache first), then `insert(conn, spec, target)`,
    which checks the input and inserts (None when the cached target was stale: looked up and
    tried once more)."""
    key = (principal.org_id, ref, version)
    for fresh in (False, True):
        target = None if fresh else targets.get(key)
        if target is None:
            target = _lookup_target(conn, principal, ref, version)
            targets.put(key, target)
        spec = specs.get(conn, target.version_id)
        inserted = insert(conn, spec, target)
        if inserted is not None:
            return target, spec, inserted
        targets.forget(key)
    raise Conflict("the agent changed while submitting", hint="submit again")
