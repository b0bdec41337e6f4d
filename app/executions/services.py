"""Executions as the API sees them: submit, read, list, logs, attempts, cancel.

PostgreSQL is the system of record. Submit commits the row and only then publishes a message that
carries the id (app/executions/dispatch.py); a worker claims the row with one conditional UPDATE
and fences every later write with the attempt it claimed (app/executions/store.py). The hot step
here, submit, is one statement on an autocommit connection.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from app.agents.lookup import CatalogRef
from app.agents.models import Agent
from app.audit import services as audit
from app.db import db, driver, page
from app.documents import services as attachments
from app.errors import NotFound, ValidationFailed
from app.executions import entries, gates
from app.executions import logs as log_lines
from app.executions.dispatch import Dispatch, dispatcher
from app.executions.models import Execution, ExecutionAttempt, ExecutionLog, JournalEntry
from app.executions.spec import DEFAULT_PRIORITY, LEVELS, VersionSpec
from app.executions.targets import Target, insert_for_target
from app.flow import quotas
from app.orgs.services import Principal

# ---------------------------------------------------------------------------------------------
# Submit


def _refuse_invalid(spec: VersionSpec, errors: dict[str, Any], what: str) -> None:
    if errors:
        raise ValidationFailed(
            f"{what} not match the agent's input_schema",
            errors=errors,
            hint=f"GET /api/v1/agents/{spec.agent_name} shows the input_schema",
        )


def submit(
    principal: Principal,
    ref: str | CatalogRef,
    payload: dict[str, Any],
    *,
    version: str | None = None,
    priority: int = DEFAULT_PRIORITY,
    rerun_of: uuid.UUID | None = None,
    traceparent: str | None = None,
    documents: list[uuid.UUID] | None = None,
    assigned_by: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Store and queue one execution (a rerun names the execution it reruns in `rerun_of`; a
    CatalogRef, another organization's public agent: the execution is the caller's).
    `documents`: the organization's documents to hand it, linked in the same transaction.
    `assigned_by`: how app/executions/assignment.py chose the agent."""
    principal.require("executions:submit")
    execution_id = uuid.uuid4()
    released = gates.Released()
    actor, created_by = audit.Actor.of(principal), audit.created_by(principal)

    def insert(conn: Connection, spec: VersionSpec, target: Target) -> Any:
        errors = spec.input_errors(payload)
        _refuse_invalid(spec, errors, "the input does")
        entry = gates.entry(conn, principal.org_id, spec)

        def insert_row() -> Any:
            return entries.insert(
                conn,
                execution_id,
                principal.org_id,
                spec,
                payload,
                priority=priority,
                pinned=target.pinned,
                entry=entry,
                rerun_of=rerun_of,
                traceparent=traceparent,
                created_by=created_by,
                audited=audit.prepare(actor, _submitted(execution_id, spec, rerun_of, assigned_by)),
                public=isinstance(ref, CatalogRef),
                assigned_by=assigned_by,
            )

        if entry.hold is None:
            return insert_row()
        return _insert_held(
            conn, principal.org_id, spec, [(execution_id, payload)], insert_row, released
        )

    with (
        quotas.admitted(principal.org_id, executions=1) as conn,
        attachments.attaching(conn, principal.org_id, {execution_id: documents or []}) as handed,
    ):
        target, spec, (queued_at, waiting_for) = insert_for_target(
            conn, principal, ref, version, insert
        )
    if waiting_for is None:
        # Committed (autocommit) before publishing: a worker never sees an id the database
        # lacks. Inside a keyed request's transaction the commit comes later, and so does the
        # publish.
        db.after_commit(dispatcher.submit, execution_id, spec, priority)
    waiting_for = _after_release(execution_id, waiting_for, released)
    gates.publish_after_commit(released.let_out)
    accepted = _accepted(
        principal,
        execution_id,
        target,
        spec,
        payload,
        priority,
        queued_at,
        waiting_for,
        rerun_of,
        traceparent,
    )
    accepted["documents"] = handed.get(execution_id, [])
    accepted["assigned_by"] = assigned_by
    return accepted


def _after_release(
    execution_id: uuid.UUID, waiting_for: str | None, released: gates.Released
) -> str | None:
    """What a held submit waits for once the release in its own transaction had its say."""
    if waiting_for in (None, "queue"):
        return waiting_for
    if execution_id in {out.execution_id for out in released.let_out}:
        return None
    return released.reasons.get(execution_id, waiting_for)


def _accepted(
    principal: Principal,
    execution_id: uuid.UUID,
    target: Target,
    spec: VersionSpec,
    payload: dict[str, Any],
    priority: int,
    queued_at: dt.datetime,
    waiting_for: str | None,
    rerun_of: uuid.UUID | None,
    traceparent: str | None,
) -> dict[str, Any]:
    """A submit's answer: the execution as stored, without reading it back."""
    return {
        "id": execution_id,
        "agent_id": target.agent_id,
        "agent_name": spec.agent_name,
        "agent_version": spec.version,
        "status": "queued",
        "priority": priority,
        "input": payload,
        "output": None,
        "error": None,
        "attempts": 0,
        "queued_at": queued_at,
        "started_at": None,
        "finished_at": None,
        "duration_ms": None,
        "resource_usage": None,
        "chain_execution_id": None,
        "waiting_for": shown_waiting_for(waiting_for),
        "rerun_of": rerun_of,
        "parent_execution_id": None,
        "children": [],
        "progress": None,
        "traceparent": traceparent,
        "created_by": audit.shown_created_by(principal.token_id, principal.token_name),
    }


def _submitted(
    execution_id: uuid.UUID,
    spec: VersionSpec,
    rerun_of: uuid.UUID | None,
    assigned_by: dict[str, Any] | None = None,
) -> audit.Change:
    if assigned_by is not None:
        return audit.Change(
            "execution.submit",
            "execution",
            execution_id,
            spec.agent_name,
            [{"op": "add", "path": "/assigned_by", "value": assigned_by}],
        )
    if rerun_of is None:
        return audit.Change("execution.submit", "execution", execution_id, spec.agent_name)
    return audit.Change(
        "execution.rerun",
        "execution",
        execution_id,
        spec.agent_name,
        [{"op": "add", "path": "/rerun_of", "value": str(rerun_of)}],
    )


def shown_waiting_for(waiting_for: str | None) -> str | None:
    """What the API says an execution waits for: a limit, or nothing (its turn in the queue)."""
    return None if waiting_for == "queue" else waiting_for


def _insert_held(
    conn: Connection,
    org_id: uuid.UUID,
    spec: VersionSpec,
    new: list[tuple[uuid.UUID, Any]],
    insert_rows: Callable[[], Any],
    released: gates.Released,
) -> Any:
    """Insert executions a limit applies to, held, under the organization's flow lock, with
    their agent's on_limit having its say; then release what may start, in the same
    transaction."""
    try:
        with driver(conn).transaction():
            gates.lock(conn, org_id)
            gates.refuse_over_limit(conn, spec, new)
            inserted = insert_rows()
            if inserted is None:
                raise _StaleTarget  # the caller tries once more
            gates.supersede(conn, spec, new)
            result = gates.release(conn, org_id)
    except _StaleTarget:
        return None
    released.let_out.extend(result.let_out)
    released.reasons.update(result.reasons)
    return inserted


class _StaleTarget(Exception):
    pass


MAX_BATCH_ITEMS = 1000


def submit_batch(
    principal: Principal,
    ref: str,
    items: list[dict[str, Any]],
    *,
    version: str | None = None,
    traceparent: str | None = None,
) -> list[uuid.UUID]:
    """Store and queue one execution per item (`input`, `priority`, `documents`), all or none:
    one invalid input refuses the whole batch (422 keyed /items/<i>/input/...). Published in
    bulk, after the commit, by the dispatcher; items held back wait in PostgreSQL
    (app/executions/gates.py)."""
    principal.require("executions:submit")
    rows = [entries.BatchRow(uuid.uuid4(), item["priority"], item["input"]) for item in items]
    released = gates.Released()
    ids = [row.id for row in rows]

    def audited(spec: VersionSpec) -> audit.Change:
        # One event for the whole batch, naming every execution it made.
        created = [{"op": "add", "path": "/executions", "value": [str(i) for i in ids]}]
        return audit.Change(
            "execution.submit_batch", "agent", spec.agent_id, spec.agent_name, created
        )

    handed = {row.id: item.get("documents") or [] for row, item in zip(rows, items, strict=True)}
    with (
        quotas.admitted(principal.org_id, executions=len(rows)) as conn,
        attachments.attaching(conn, principal.org_id, handed, attachments.batch_pointer),
    ):
        stored = store_batch(
            conn, principal, ref, version, rows, released, traceparent=traceparent, audited=audited
        )
    publish_batches([stored], released)
    return ids


@dataclass(frozen=True)
class StoredBatch:
    spec: VersionSpec
    rows: list[entries.BatchRow]
    waiting: dict[uuid.UUID, str | None]


def store_batch(
    conn: Connection,
    principal: Principal,
    ref: str,
    version: str | None,
    rows: list[entries.BatchRow],
    released: gates.Released,
    pointer: Callable[[int], str] = lambda index: f"/items/{index}/input",
    traceparent: str | None = None,
    audited: Callable[[VersionSpec], audit.Change] | None = None,
) -> StoredBatch:
    """Check and insert a batch of one agent version, all or none, on a connection the
    organization's quotas admitted it on (publish it with publish_batches once committed).
    Invalid inputs: 422 keyed by `pointer(index)`. `audited`: the audit event the insert
    writes, given the version it runs."""

    def insert(conn: Connection, spec: VersionSpec, target: Target) -> Any:
        errors: dict[str, Any] = {}
        for index, row in enumerate(rows):
            errors.update(spec.input_errors(row.input, pointer(index)))
        _refuse_invalid(spec, errors, "inputs of the batch do")
        entry = gates.entry(conn, principal.org_id, spec)

        def insert_rows() -> Any:
            return entries.insert_batch(
                conn,
                principal.org_id,
                spec,
                rows,
                pinned=target.pinned,
                entry=entry,
                traceparent=traceparent,
                created_by=audit.created_by(principal),
                audited=audit.prepare(audit.Actor.of(principal), audited(spec))
                if audited
                else None,
            )

        if entry.hold is None:
            return insert_rows()
        new = [(row.id, row.input) for row in rows]
        return _insert_held(conn, principal.org_id, spec, new, insert_rows, released)

    _, spec, waiting = insert_for_target(conn, principal, ref, version, insert)
    return StoredBatch(spec, rows, waiting)


def publish_batches(batches: list[StoredBatch], released: gates.Released) -> None:
    """Publish committed batches in bulk: the rows no limit holds back, and those let out."""
    db.after_commit(
        dispatcher.submit_many,
        [
            Dispatch(row.id, batch.spec, row.priority)
            for batch in batches
            for row in batch.rows
            if batch.waiting[row.id] is None
        ],
    )
    gates.publish_after_commit(released.let_out)


# ---------------------------------------------------------------------------------------------
# Reading (the API side)


def present(row: Mapping[str, Any] | Execution) -> dict[str, Any]:
    get = row.__getitem__ if isinstance(row, Mapping) else lambda name: getattr(row, name)
    started, finished = get("started_at"), get("finished_at")
    return {
        "id": get("id"),
        "agent_id": get("agent_id"),
        "agent_name": get("agent_name"),
        "agent_version": get("agent_version"),
        "status": get("status"),
        "priority": get("priority"),
        "input": get("input"),
        "output": get("output"),
        "error": get("error"),
        "attempts": get("attempt"),
        "queued_at": get("queued_at"),
        "started_at": started,
        "finished_at": finished,
        "duration_ms": (
            round((finished - started).total_seconds() * 1000) if started and finished else None
        ),
        "resource_usage": get("resource_usage"),
        "chain_execution_id": get("chain_execution_id"),
        "waiting_for": shown_waiting_for(get("waiting_for")),
        "rerun_of": get("rerun_of"),
        "parent_execution_id": get("parent_execution_id"),
        "children": list((row.get("children") if isinstance(row, Mapping) else row.children) or []),
        "progress": get("progress"),
        "traceparent": get("traceparent"),
        "created_by": audit.shown_created_by(
            get("created_by_token_id"), get("created_by_token_name")
        ),
        "assigned_by": get("assigned_by"),
    }


def present_in_full(conn: Connection | Session, row: Mapping[str, Any] | Execution) -> dict:
    """One execution as GET /executions/{id} shows it (also its stream's `end` and its
    notifications): `present`, and the documents it was handed (one indexed read; lists leave
    them out)."""
    execution_id = row["id"] if isinstance(row, Mapping) else row.id
    return {**present(row), "documents": attachments.attached(conn, execution_id)}


def parse_id(execution_id: str | uuid.UUID) -> uuid.UUID:
    try:
        return execution_id if isinstance(execution_id, uuid.UUID) else uuid.UUID(execution_id)
    except ValueError as exc:
        raise NotFound(f"no execution {execution_id!r}") from exc


def get(session: Session, principal: Principal, execution_id: str | uuid.UUID) -> Execution:
    found = session.scalar(
        select(Execution).where(
            Execution.id == parse_id(execution_id), Execution.org_id == principal.org_id
        )
    )
    if found is None:
        raise NotFound(f"no execution {execution_id}", hint="GET /api/v1/executions lists them")
    return found


def list_executions(
    session: Session,
    principal: Principal,
    *,
    agent: str | None,
    status: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    offset: int,
    limit: int,
    chain_execution_id: uuid.UUID | None = None,
) -> tuple[list[Execution], int]:
    query = select(Execution).where(Execution.org_id == principal.org_id)
    if chain_execution_id:
        query = query.where(Execution.chain_execution_id == chain_execution_id)
    if agent:
        try:
            query = query.where(Execution.agent_id == uuid.UUID(agent))
        except ValueError:
            agent_ids = select(Agent.id).where(
                Agent.org_id == principal.org_id, Agent.name == agent
            )
            query = query.where(Execution.agent_id.in_(agent_ids))
    if status:
        query = query.where(Execution.status == status)
    if since:
        query = query.where(Execution.queued_at >= since)
    if until:
        query = query.where(Execution.queued_at < until)
    return page(
        session, query, Execution.queued_at.desc(), Execution.id.desc(), offset=offset, limit=limit
    )


def logs(
    session: Session,
    principal: Principal,
    execution_id: str,
    *,
    level: str | None,
    q: str | None,
    after_seq: int | None,
    limit: int,
) -> list[dict[str, Any]]:
    execution = get(session, principal, execution_id)
    query = select(ExecutionLog).where(ExecutionLog.execution_id == execution.id)
    if level:
        query = query.where(ExecutionLog.level >= LEVELS[level])
    if q:
        query = query.where(log_lines.contains(q))
    if after_seq is not None:
        query = query.where(ExecutionLog.seq > after_seq)
    rows = session.scalars(query.order_by(ExecutionLog.seq).limit(limit)).all()
    return [log_lines.line(r) for r in rows]


def journal(session: Session, principal: Principal, execution_id: str) -> list[JournalEntry]:
    """The durable calls an execution recorded, in order (404 for another organization's)."""
    execution = get(session, principal, execution_id)
    return list(
        session.scalars(
            select(JournalEntry)
            .where(JournalEntry.execution_id == execution.id)
            .order_by(JournalEntry.seq)
        )
    )


def attempts(session: Session, principal: Principal, execution_id: str) -> list[dict[str, Any]]:
    """Every attempt, oldest first: those the execution went on from, as recorded, then the
    latest one (running or final), which is the execution row itself."""
    execution = get(session, principal, execution_id)
    rows = session.scalars(
        select(ExecutionAttempt)
        .where(ExecutionAttempt.execution_id == execution.id)
        .order_by(ExecutionAttempt.attempt)
    ).all()
    listed = [
        {
            "attempt": row.attempt,
            "status": row.status,
            "error": row.error,
            "worker": row.worker,
            "started_at": row.started_at,
            "finished_at": row.finished_at,
            "resource_usage": row.resource_usage,
        }
        for row in rows
    ]
    recorded = {row.attempt for row in rows}
    if execution.attempt >= 1 and execution.attempt not in recorded:
        listed.append(
            {
                "attempt": execution.attempt,
                "status": execution.status,
                "error": execution.error,
                "worker": execution.worker,
                "started_at": execution.started_at,
                "finished_at": execution.finished_at,
                "resource_usage": execution.resource_usage,
            }
        )
    return listed
