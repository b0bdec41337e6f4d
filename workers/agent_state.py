"""`ctx.state`: the agent's state in its execution's organization, read and written from the
agent's own code (app/state/services.py, on the attempt's connection).

An agent's own writes are not audit events (they are its work, as its output is); writes over
the API are. Values round-trip through JSON: what `get` answers is what JSON made of what `set`
was given (tuples come back as lists, keys of objects as strings).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Connection

from app.errors import StateConflict
from app.state import services

__all__ = ["AgentState", "StateConflict"]


class AgentState:
    """`ctx.state` of one execution: `connect()` is a context manager yielding the connection
    for the next statements (the attempt's: AttemptDatabase.connection), each write one
    statement of its own."""

    def __init__(
        self,
        connect: Callable[[], AbstractContextManager[Connection]],
        org_id: uuid.UUID | str,
        agent_id: uuid.UUID | str,
    ) -> None:
        self._connect = connect
        self._org_id = uuid.UUID(str(org_id))
        self._agent_id = uuid.UUID(str(agent_id))

    def get(self, key: str, default: Any = None) -> Any:
        """The key's value, or `default` when it is not set."""
        found = self.entry(key)
        return default if found is None else found["value"]

    def entry(self, key: str) -> dict[str, Any] | None:
        """`{"value", "version"}`, or None when the key is not set."""
        with self._connect() as conn:
            found = services.entry(conn, self._org_id, self._agent_id, key)
        return None if found is None else {"value": found["value"], "version": found["version"]}

    def set(self, key: str, value: Any, expected_version: int | None = None) -> int:
        """Store the value (JSON, at most 256 kB) and answer its new version. With
        `expected_version`, only if the key is at that version (0: not set yet), else
        StateConflict (its `current_version` says where the key is)."""
        with self._connect() as conn:
            written = services.put(
                conn, self._org_id, self._agent_id, key, value, expected_version=expected_version
            )
        return written["version"]

    def delete(self, key: str) -> bool:
        """Remove the key: True, or False when it was not set."""
        with self._connect() as conn:
            return services.delete(conn, self._org_id, self._agent_id, key)

    def __repr__(self) -> str:
        return f"<ctx.state of agent {self._agent_id}>"
