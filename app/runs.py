"""Starting runs for schedules and webhook triggers: the one interface between them and the
executions and chains they start.

    resolve(conn, org_id, target)          -> Target   (422 when it names nothing runnable)
    check_input(conn, target, payload)     -> None     (422 keyed by JSON pointer)
    chain_launch(conn, org_id, chain_id, version, payload, id) -> ChainLaunch (422 or 409)
    launch(conn, [Launch | ChainLaunch])   -> Launched (rows inserted in the caller's transaction)
    publish(launched)                      -> once the caller has committed
    publish_after_commit(launched)         -> the same, deferred to a keyed request's commit

A target is an agent ({"agent": name}) or a chain ({"chain": name}), each optionally pinning a
`version`; schedules and triggers store the agent's or the chain's id (exactly one is set).
Agent runs are inserted set-based, many in one statement (`Launch`); chain runs one by one
through the chain services (`chain_launch` checks and builds one, `ChainLaunch`), which is the
path the chains API takes too. Either way the rows go in the caller's transaction and are
published after it commits.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from app import jsonschemas
from app.agents.lookup import find_agent, find_version_id
from app.chains import launch as chains
from app.chains import services as chain_definitions
from app.chains.models import Chain, ChainExecution, ChainVersion
from app.db import db
from app.errors import Conflict, ValidationFailed
from app.executions import dispatch, entries, gates
from app.executions.dispatch import Dispatch
from app.executions.spec import VersionSpec
from app.executions.store import LetOut
from app.executions.versions import specs


@dataclass(frozen=True)
class Target:
    kind: str  # "agent" or "chain"
    name: str
    version: str | None
    agent_id: uuid.UUID | None
    # Set when the target pins an agent version; otherwise each run takes the current version.
    # A chain's pinned version is found by `version` (chain versions never change).
    version_id: uuid.UUID | None
    chain_id: uuid.UUID | None = None


_CHAIN = text("SELECT id, name, archived_at FROM chains WHERE org_id = :org_id AND name = :name")
_CHAIN_VERSION = text(
    """
    SELECT CASE WHEN CAST(:version AS text) IS NULL THEN c.current_version_id
                ELSE (SELECT v.id FROM chain_versions v
                      WHERE v.chain_id = c.id AND v.version = :version) END
    FROM chains c WHERE c.id = :chain_id
    """
)


def chain_version_id(
    conn: Connection, chain_id: uuid.UUID, name: str, version: str | None
) -> uuid.UUID:
    """The chain version a run takes: the pinned one, else the current one."""
    found = conn.execute(_CHAIN_VERSION, {"chain_id": chain_id, "version": version}).scalar()
    if found is None:
        raise ValidationFailed(
            f"chain {name!r} has no version {version!r}",
            errors={"/target/version": ["no such version"]},
            hint=f"GET /api/v1/chains/{name}/versions lists them",
        )
    return found


def _resolve_chain(conn: Connection, org_id: uuid.UUID, target: dict[str, Any]) -> Target:
    name = target.get("chain")
    row = conn.execute(_CHAIN, {"org_id": org_id, "name": name}).mappings().first()
    if row is None:
        raise ValidationFailed(
            f"no chain {name!r}",
            errors={"/target/chain": ["no such chain in your organization"]},
            hint="GET /api/v1/chains lists your chains",
        )
    if row["archived_at"] is not None:
        raise ValidationFailed(
            f"chain {name!r} is archived and takes no new executions",
            errors={"/target/chain": ["archived"]},
            hint="target a live chain; GET /api/v1/chains lists them",
        )
    version = target.get("version")
    if version is not None:
        chain_version_id(conn, row["id"], name, version)
    return Target("chain", name, version, None, None, row["id"])


def resolve(conn: Connection, org_id: uuid.UUID, target: dict[str, Any]) -> Target:
    if "chain" in target:
        return _resolve_chain(conn, org_id, target)
    name = target.get("agent")
    row = find_agent(conn, org_id, name, by_id=False)
    if row is None:
        raise ValidationFailed(
            f"no agent {name!r}",
            errors={"/target/agent": ["no such agent in your organization"]},
            hint="GET /api/v1/agents lists your agents",
        )
    if row["archived_at"] is not None:
        raise ValidationFailed(
            f"agent {name!r} is archived and takes no new executions",
            errors={"/target/agent": ["archived"]},
            hint="target a live agent",
        )
    version = target.get("version")
    version_id = None
    if version is not None:
        version_id = find_version_id(conn, row["id"], version)
        if version_id is None:
            raise ValidationFailed(
                f"agent {name!r} has no version {version!r}",
                errors={"/target/version": ["no such version"]},
                hint=f"GET /api/v1/agents/{name}/versions lists them",
            )
    return Target("agent", name, version, row["id"], version_id)


_CURRENT = text("SELECT name, current_version_id, archived_at FROM agents WHERE id = :id")


def spec_for(conn: Connection, agent_id: uuid.UUID, version_id: uuid.UUID | None) -> VersionSpec:
    """The version a run of the agent takes; 409 when the agent is archived, as for a submit."""
    agent = conn.execute(_CURRENT, {"id": agent_id}).one()
    if agent.archived_at is not None:
        raise Conflict(
            f"agent {agent.name!r} is archived and takes no new executions",
            hint="point the schedule or trigger at a live agent (PATCH it), or delete it",
        )
    return specs.get(conn, version_id or agent.current_version_id)


_CHAIN_INPUT_SCHEMA = text("SELECT input_schema FROM chain_versions WHERE id = :id")


def check_input(conn: Connection, target: Target, payload: Any, pointer: str = "/input") -> None:
    if target.chain_id is not None:
        version_id = chain_version_id(conn, target.chain_id, target.name, target.version)
        schema = conn.execute(_CHAIN_INPUT_SCHEMA, {"id": version_id}).scalar_one()
        errors = jsonschemas.instance_errors(jsonschemas.validator_for(schema), payload, pointer)
        if errors:
            raise ValidationFailed(
                "the input does not match the target chain's input_schema",
                errors=errors,
                hint=f"GET /api/v1/chains/{target.name} shows the input_schema",
            )
        return
    spec = spec_for(conn, target.agent_id, target.version_id)
    errors = spec.input_errors(payload, pointer)
    if errors:
        raise ValidationFailed(
            "the input does not match the target's input_schema",
            errors=errors,
            hint=f"GET /api/v1/agents/{spec.agent_name} shows the input_schema",
        )


@dataclass(frozen=True)
class Launch:
    """One run to start: the execution id is chosen by the caller, so its own rows (a fire
    record, a delivery) can name it in the same transaction."""

    execution_id: uuid.UUID
    org_id: uuid.UUID
    spec: VersionSpec
    input: dict[str, Any]


@dataclass(frozen=True)
class ChainLaunch:
    """One chain run to start: the chain execution row, checked and built, not yet inserted."""

    execution: ChainExecution

    @property
    def execution_id(self) -> uuid.UUID:
        return self.execution.id


def _joined(conn: Connection) -> Session:
    """An ORM session inside the caller's transaction: it neither commits nor, on close, rolls
    back that transaction (nor opens a savepoint of its own when the caller is in one)."""
    return Session(bind=conn, join_transaction_mode="rollback_only")


def chain_launch(
    conn: Connection,
    org_id: uuid.UUID,
    chain_id: uuid.UUID,
    version: str | None,
    payload: Any,
    execution_id: uuid.UUID,
) -> ChainLaunch:
    """Check and build a chain run the way the chains API does (chains.new_execution): 422 for
    an input its chain version refuses, 409 when the chain is archived or a step cannot run."""
    with _joined(conn) as session:
        chain = session.get(Chain, chain_id)
        assert chain is not None, "the chain's rows cascade away with it"
        if chain.archived_at is not None:
            raise chain_definitions.archived(chain)
        chain_version = session.get(
            ChainVersion, chain_version_id(conn, chain_id, chain.name, version)
        )
        assert chain_version is not None
        return ChainLaunch(
            chains.new_execution(
                session, org_id, chain, chain_version, payload, execution_id=execution_id
            )
        )


@dataclass
class Launched:
    dispatches: list[Dispatch] = field(default_factory=list)
    # (chain execution id, chain version id) of each chain run inserted.
    chain_runs: list[tuple[uuid.UUID, uuid.UUID]] = field(default_factory=list)
    # Held runs the gates let out at once (stamped dispatched already).
    let_out: list[LetOut] = field(default_factory=list)


def launch(
    conn: Connection, launches: list[Launch | ChainLaunch], *, on_limit: bool = True
) -> Launched:
    """Insert the runs in the caller's transaction (the agent runs with one statement); publish
    after commit. Runs a limit applies to are held and released by the gates, under each
    organization's flow lock (taken in organization order: two beats cannot deadlock), after
    their agents' on_limit had its say (unless `on_limit` is False: beat's batches of fires
    queue them, as `queue` would)."""
    runs = [item for item in launches if isinstance(item, Launch)]
    rows = [
        entries.NewExecution(
            item.execution_id,
            item.org_id,
            item.spec,
            item.input,
            entry=gates.entry(conn, item.org_id, item.spec),
        )
        for item in runs
    ]
    held_orgs = sorted({row.org_id for row in rows if row.entry.hold is not None})

    def limited(org_id: uuid.UUID) -> dict[uuid.UUID, tuple[VersionSpec, list]]:
        """The organization's runs a limit applies to, by agent version: on_limit decides
        over all of a version's new runs at once (the newest of a key wins)."""
        by_version: dict[uuid.UUID, tuple[VersionSpec, list]] = {}
        for row in rows:
            if row.org_id == org_id and row.entry.hold is not None:
                by_version.setdefault(row.spec.id, (row.spec, []))[1].append((row.id, row.input))
        return by_version

    for org_id in held_orgs:
        gates.lock(conn, org_id)
        if on_limit:
            for spec, new in limited(org_id).values():
                gates.refuse_over_limit(conn, spec, new)
    waiting = entries.insert_many(conn, rows) if rows else {}
    launched = Launched(
        [Dispatch(row.id, row.spec, row.priority) for row in rows if waiting[row.id] is None]
    )
    for org_id in held_orgs:
        if on_limit:
            for spec, new in limited(org_id).values():
                gates.supersede(conn, spec, new)
        launched.let_out.extend(gates.release(conn, org_id).let_out)
    chain_rows = [item.execution for item in launches if isinstance(item, ChainLaunch)]
    if chain_rows:
        with _joined(conn) as session:
            session.add_all(chain_rows)
            session.flush()
        launched.chain_runs = [(row.id, row.chain_version_id) for row in chain_rows]
    return launched


def _publish_chain_runs(launched: Launched) -> None:
    if launched.chain_runs:
        with db.hot() as conn:
            for chain_execution_id, version_id in launched.chain_runs:
                chains.publish_committed(conn, chain_execution_id, version_id)


def publish(launched: Launched) -> None:
    dispatch.publish_committed(launched.dispatches)
    gates.publish_now(launched.let_out)
    _publish_chain_runs(launched)


def publish_after_commit(launched: Launched) -> None:
    """Publish once the caller's transaction has committed: at once outside a keyed request,
    at the request's commit inside one (never, if it rolls back)."""
    db.after_commit(publish, launched)


def publish_unstamped(launched: Launched) -> list[uuid.UUID]:
    """Publish now, stamp later with `stamp`: for a caller publishing many batches in a row,
    whose next batch should not wait behind the previous one's stamping. (Chain runs carry
    no dispatch stamp: resume_stalled finds one whose publish was lost.)"""
    _publish_chain_runs(launched)
    gates.publish_now(launched.let_out)
    return dispatch.publish_many(launched.dispatches)


def stamp(execution_ids: list[uuid.UUID]) -> None:
    dispatch.stamp_dispatched(execution_ids)
