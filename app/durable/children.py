"""Children of durable agents: ctx.start / ctx.run insert a child execution and its journal
entry in one transaction, fenced by the parent's attempt, so a parent that replays after a
crash finds the child it started instead of starting another."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection

from app.agents.lookup import find_agent, find_version_id
from app.db import driver
from app.durable import journal
from app.executions import entries, gates
from app.executions.store import LetOut
from app.executions.versions import specs

MAX_DEPTH = 10
MAX_CHILDREN = 1000


class ChildRefused(ValueError):
    """The child cannot be started (no such agent or version, an input its schema refuses,
    too deep, too many children): the agent's bug, raised in the agent."""


_PARENT = """
    SELECT depth, (SELECT count(*) FROM execution_journal
                   WHERE execution_id = %(id)s AND kind = 'child')
    FROM executions WHERE id = %(id)s
"""


def _spec(conn: Connection, org_id: uuid.UUID, agent: str, version: str | None):
    row = find_agent(conn, org_id, agent, by_id=True)
    if row is None:
        raise ChildRefused(f"ctx.start: no agent {agent!r} in this organization")
    if row["archived_at"] is not None:
        raise ChildRefused(f"ctx.start: agent {agent!r} is archived and takes no new executions")
    version_id = row["current_version_id"]
    if version is not None:
        version_id = find_version_id(conn, row["id"], version)
        if version_id is None:
            raise ChildRefused(f"ctx.start: agent {agent!r} has no version {version!r}")
    return specs.get(conn, version_id)


def start(
    conn: Connection,
    org_id: uuid.UUID,
    parent_id: uuid.UUID,
    attempt: int,
    seq: int,
    agent: str,
    payload: Any,
    version: str | None = None,
) -> uuid.UUID:
    """Start a child of the parent's running attempt as its journal entry `seq`; its id."""
    spec = _spec(conn, org_id, agent, version)
    errors = spec.input_errors(payload, "/input")
    if errors:
        details = "; ".join(f"{pointer}: {', '.join(msgs)}" for pointer, msgs in errors.items())
        raise ChildRefused(f"ctx.start({spec.agent_name!r}): the input is refused: {details}")
    pg = driver(conn)
    depth, children = pg.execute(_PARENT, {"id": parent_id}).fetchone()
    if depth + 1 > MAX_DEPTH:
        raise ChildRefused(
            f"ctx.start({spec.agent_name!r}): a child would be {depth + 1} levels deep; "
            f"executions nest at most {MAX_DEPTH} deep"
        )
    if children >= MAX_CHILDREN:
        raise ChildRefused(
            f"ctx.start({spec.agent_name!r}): this execution started {children} children "
            f"already, the most one may start"
        )
    hold = gates.entry(conn, org_id, spec).hold
    child_id = uuid.uuid4()
    released = gates.Released()
    with pg.transaction():
        if hold is not None:
            gates.lock(conn, org_id)
        priority = entries.insert_child(conn, child_id, parent_id, attempt, spec, payload, hold)
        if priority is None:
            raise journal.Fenced(f"execution {parent_id}: attempt {attempt} no longer runs")
        pg.execute(
            "INSERT INTO execution_journal "
            "(execution_id, seq, org_id, kind, name, status, child_execution_id) "
            "VALUES (%s, %s, %s, 'child', %s, 'pending', %s)",
            (parent_id, seq, org_id, spec.agent_name, child_id),
        )
        if hold is not None:
            released = gates.release(conn, org_id)
    let_out = released.let_out if hold is not None else [LetOut(child_id, spec.id, priority)]
    gates.publish(conn, let_out)
    return child_id
