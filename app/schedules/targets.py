"""What a schedule or a webhook trigger starts: the one interface between them and the runs.

    resolve(conn, org_id, target)          -> Target   (422 when it names nothing runnable)
    check_input(conn, target, payload)     -> None     (422 keyed by JSON pointer)
    launch(conn, [Launch, ...])            -> Launched (rows inserted in the caller's transaction)
    publish(launched)                      -> after the caller has committed

Agent targets are complete. Chain targets ({"chain": name}) are refused with 422 until chains
(issue 4) land. Where they plug in: `resolve` looks the chain up (its id goes in a new
schedules/triggers column beside agent_id), `check_input` checks against the chain's
input_schema, `Launch`/`launch` insert chain executions beside the agent ones in the same
statement set and `Launched` carries their ids (schedule_fires.chain_execution_id exists
already) to `publish`. The places that refuse a chain today and would call these instead:
firing.py `_Planner.refusal` and `_Planner.fire`, services.py `trigger_now`, and
app/triggers/services.py `deliver`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, text

from app import jsonschemas
from app.errors import Conflict, ValidationFailed
from app.executions import services as executions
from app.executions.services import Dispatch, NewExecution, VersionSpec


@dataclass(frozen=True)
class Target:
    kind: str  # "agent" ("chain" once issue 4 lands)
    name: str
    version: str | None
    agent_id: uuid.UUID
    # Set when the target pins a version; otherwise each run takes the current version.
    version_id: uuid.UUID | None


def chains_unavailable(pointer: str = "/target/chain") -> ValidationFailed:
    return ValidationFailed(
        "chain targets are not available yet",
        errors={pointer: ["chains are not part of this build"]},
        hint='target an agent for now: {"agent": "<name>"}',
    )


_AGENT = text("SELECT id, name, archived_at FROM agents WHERE org_id = :org_id AND name = :name")
_VERSION = text("SELECT id FROM agent_versions WHERE agent_id = :agent_id AND version = :version")


def resolve(conn: Connection, org_id: uuid.UUID, target: dict[str, Any]) -> Target:
    if "chain" in target:
        raise chains_unavailable()
    name = target.get("agent")
    row = conn.execute(_AGENT, {"org_id": org_id, "name": name}).mappings().first()
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
        version_id = conn.execute(_VERSION, {"agent_id": row["id"], "version": version}).scalar()
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
    return executions.specs.get(conn, version_id or agent.current_version_id)


def input_errors(spec: VersionSpec, payload: Any, pointer: str = "/input") -> dict[str, Any]:
    # is_valid stops at the first problem and builds no error objects: the cheap answer for
    # the usual valid input, checked once per fire.
    if spec.input_validator.is_valid(payload):
        return {}
    return jsonschemas.instance_errors(spec.input_validator, payload, pointer)


def check_input(conn: Connection, target: Target, payload: Any, pointer: str = "/input") -> None:
    spec = spec_for(conn, target.agent_id, target.version_id)
    errors = input_errors(spec, payload, pointer)
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


@dataclass
class Launched:
    dispatches: list[Dispatch] = field(default_factory=list)


def launch(conn: Connection, launches: list[Launch]) -> Launched:
    """Insert the runs in the caller's transaction with one statement; publish after commit."""
    rows = [
        NewExecution(item.execution_id, item.org_id, item.spec, item.input) for item in launches
    ]
    return Launched(executions.insert_queued(conn, rows))


def publish(launched: Launched) -> None:
    executions.publish_committed(launched.dispatches)


def publish_unstamped(launched: Launched) -> list[uuid.UUID]:
    """Publish now, stamp later with `stamp`: for a caller publishing many batches in a row,
    whose next batch should not wait behind the previous one's stamping."""
    return executions.publish_many(launched.dispatches)


def stamp(execution_ids: list[uuid.UUID]) -> None:
    executions.stamp_dispatched(execution_ids)
