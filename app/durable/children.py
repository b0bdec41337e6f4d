"""Children of durable agents: ctx.start / ctx.run insert a child execution and its journal
entry in one transaction, fenced by the parent's attempt, so a parent that replays after a
crash finds the child it started instead of starting another."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection

from app.agents.lookup import find_agent, find_version_id
from app.audit import services as audit
from app.db import db, driver
from app.durable import journal
from app.errors import Conflict, NotFound, ValidationFailed
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
    seq: int | None,
    agent: str,
    payload: Any,
    version: str | None = None,
    audited: audit.Actor | None = None,
) -> uuid.UUID:
    """Start a child of the parent's running attempt as its journal entry `seq` (None: the
    next one, for a child started over the API with the execution's token, which writes an
    audit event as the execution); the child's id."""
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
        if seq is None:
            # Children started over the API at once take their numbers one after the other.
            pg.execute("SELECT 1 FROM executions WHERE id = %s FOR UPDATE", (parent_id,))
        pg.execute(
            "INSERT INTO execution_journal "
            "(execution_id, seq, org_id, kind, name, status, child_execution_id) "
            "VALUES (%(parent)s, coalesce(%(seq)s, (SELECT coalesce(max(seq), 0) + 1 "
            "FROM execution_journal WHERE execution_id = %(parent)s)), %(org)s, 'child', "
            "%(name)s, 'pending', %(child)s)",
            {"parent": parent_id, "seq": seq, "org": org_id, "name": agent, "child": child_id},
        )
        if audited is not None:
            audit.record(
                conn,
                audited,
                audit.Change("execution.submit", "execution", child_id, spec.agent_name),
            )
        if hold is not None:
            released = gates.release(conn, org_id)
    let_out = released.let_out if hold is not None else [LetOut(child_id, spec.id, priority)]
    gates.publish(conn, let_out)
    return child_id


def start_over_api(principal: Any, agent: str, payload: Any, version: str | None) -> uuid.UUID:
    """A submit made with an execution's own token (a command or http agent's
    RUNYARD_EXECUTION_TOKEN): the new execution is that execution's child. 404 for an agent
    the organization lacks, 422 for what the child rules refuse, 409 once the run ended."""
    with db.hot() as conn:
        if find_agent(conn, principal.org_id, agent, by_id=True) is None:
            raise NotFound(f"no agent {agent!r}", hint="GET /api/v1/agents lists your agents")
        try:
            return start(
                conn,
                principal.org_id,
                principal.execution_id,
                principal.execution_attempt,
                None,
                agent,
                payload,
                version,
                audited=audit.Actor.of(principal),
            )
        except journal.Fenced as exc:
            raise Conflict(
                "the execution this token belongs to no longer runs",
                hint="an execution token starts children only while its execution runs",
            ) from exc
        except ChildRefused as exc:
            raise ValidationFailed(
                str(exc).removeprefix("ctx.start: "),
                errors={"/input": [str(exc)]},
                hint=f"GET /api/v1/agents/{agent} shows its input_schema and versions",
            ) from exc
