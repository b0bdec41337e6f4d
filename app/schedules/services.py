"""Schedules as the API sees them: create, read, change, pause, resume, delete, fire now,
history. What beat does with them every tick is in app/schedules/firing.py.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import outbox, runs
from app.audit import services as audit
from app.db import db, page, utcnow
from app.errors import Conflict, NotFound, ValidationFailed
from app.flow import quotas
from app.orgs.services import Principal
from app.schedules import cron
from app.schedules.models import Schedule, ScheduleFire

EDITABLE = (
    "name",
    "target",
    "cron",
    "timezone",
    "input",
    "enabled",
    "overlap",
    "catchup",
    "catchup_window_seconds",
    "pause_after_failures",
)


# ---------------------------------------------------------------------------------------------
# Definitions


def _parse_id(ref: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(ref)
    except ValueError:
        return None


def get(session: Session, principal: Principal, ref: str, *, lock: bool = False) -> Schedule:
    """A schedule of the caller's organization, by id or name; anything else is 404."""
    query = select(Schedule).where(Schedule.org_id == principal.org_id)
    ref_id = _parse_id(ref)
    query = query.where(Schedule.id == ref_id if ref_id else Schedule.name == ref)
    if lock:
        query = query.with_for_update()
    found = session.scalar(query)
    if found is None:
        raise NotFound(f"no schedule {ref!r}", hint="GET /api/v1/schedules lists them")
    return found


def _target_of(schedule: Schedule) -> dict[str, Any]:
    body: dict[str, Any] = {schedule.target_kind: schedule.target_name}
    if schedule.target_version:
        body["version"] = schedule.target_version
    return body


def _apply_target(session: Session, schedule: Schedule, target: dict, payload: dict) -> None:
    conn = session.connection()
    resolved = runs.resolve(conn, schedule.org_id, target)
    runs.check_input(conn, resolved, payload)
    schedule.target_kind = resolved.kind
    schedule.target_name = resolved.name
    schedule.target_version = resolved.version
    schedule.agent_id = resolved.agent_id
    schedule.version_id = resolved.version_id
    schedule.chain_id = resolved.chain_id


def _check_catchup_window(data: dict[str, Any]) -> None:
    if data.get("catchup") == "all" and data.get("catchup_window_seconds") == 0:
        raise ValidationFailed(
            "catchup 'all' with a window of 0 seconds would never catch up",
            errors={"/catchup_window_seconds": ["must be above 0 with catchup 'all'"]},
        )


def create(session: Session, principal: Principal, data: dict[str, Any]) -> Schedule:
    principal.require("agents:write")
    cron.check(data["cron"], data["timezone"])
    _check_catchup_window(data)
    schedule = Schedule(
        org_id=principal.org_id,
        name=data["name"],
        cron=data["cron"],
        timezone=data["timezone"],
        input=data["input"],
        enabled=data["enabled"],
        overlap=data["overlap"],
        catchup=data["catchup"],
        catchup_window_seconds=data["catchup_window_seconds"],
        pause_after_failures=data["pause_after_failures"],
        consecutive_failures=0,
    )
    _apply_target(session, schedule, data["target"], data["input"])
    if schedule.enabled:
        schedule.next_fire_at = cron.next_after(schedule.cron, schedule.timezone, utcnow())
    schedule.created_by_token_id = principal.token_id
    schedule.created_by_token_name = principal.token_name
    session.add(schedule)
    _flush_or_conflict(session, schedule.name)
    _audit(session, principal, "schedule.create", schedule)
    return schedule


def _audit(
    session: Session,
    principal: Principal,
    action: str,
    schedule: Schedule,
    changes: list[dict[str, Any]] | None = None,
) -> None:
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change(action, "schedule", schedule.id, schedule.name, changes),
    )


def _audited_state(schedule: Schedule) -> dict[str, Any]:
    shown = present(schedule)
    return {key: shown[key] for key in EDITABLE}


def _flush_or_conflict(session: Session, name: str) -> None:
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(
            f"a schedule named {name!r} exists already",
            hint="choose another name, or PATCH the existing schedule",
        ) from exc


def update(session: Session, principal: Principal, ref: str, data: dict[str, Any]) -> Schedule:
    principal.require("agents:write")
    # Locked: beat skips a schedule being edited (SKIP LOCKED) and sees the edit next tick.
    schedule = get(session, principal, ref, lock=True)
    before = _audited_state(schedule)
    was_enabled = schedule.enabled
    merged = {field: getattr(schedule, field, None) for field in EDITABLE}
    merged["target"] = _target_of(schedule)
    merged.update(data)
    if "cron" in data or "timezone" in data:
        cron.check(merged["cron"], merged["timezone"])
    _check_catchup_window(merged)
    if "target" in data or "input" in data:
        _apply_target(session, schedule, merged["target"], merged["input"])
    for name in EDITABLE:
        if name in data and name != "target":
            setattr(schedule, name, data[name])
    if "enabled" in data and data["enabled"] != was_enabled:
        _set_enabled(session, schedule, data["enabled"], reason="disabled through the API")
    elif schedule.enabled and ("cron" in data or "timezone" in data):
        schedule.next_fire_at = cron.next_after(schedule.cron, schedule.timezone, utcnow())
    schedule.updated_at = utcnow()
    _flush_or_conflict(session, schedule.name)
    changes = audit.changes_between(before, _audited_state(schedule))
    _audit(session, principal, "schedule.update", schedule, changes)
    return schedule


def _set_enabled(session: Session, schedule: Schedule, enabled: bool, reason: str) -> None:
    schedule.enabled = enabled
    if enabled:
        # Resuming never catches up the paused time: the next fire is the next one from now.
        schedule.next_fire_at = cron.next_after(schedule.cron, schedule.timezone, utcnow())
        schedule.paused_reason = None
        schedule.consecutive_failures = 0
    else:
        schedule.next_fire_at = None
        schedule.paused_reason = reason
        session.execute(_DROP_BUFFERED, {"ids": [schedule.id], "reason": f"schedule {reason}"})
        events = outbox.schedules_paused(session.connection(), [schedule.id])
        db.after_commit(outbox.publish, events)


_DROP_BUFFERED = text(
    """
    UPDATE schedule_fires SET status = 'skipped', skipped_reason = :reason
    WHERE schedule_id = ANY(:ids) AND status = 'buffered'
    """
)


def pause(session: Session, principal: Principal, ref: str) -> Schedule:
    principal.require("executions:submit")
    schedule = get(session, principal, ref, lock=True)
    if schedule.enabled:
        _set_enabled(session, schedule, False, reason="paused through the API")
        schedule.updated_at = utcnow()
        session.flush()
    _audit(session, principal, "schedule.pause", schedule)
    return schedule


def resume(session: Session, principal: Principal, ref: str) -> Schedule:
    principal.require("executions:submit")
    schedule = get(session, principal, ref, lock=True)
    if not schedule.enabled:
        _set_enabled(session, schedule, True, reason="")
        schedule.updated_at = utcnow()
        session.flush()
    _audit(session, principal, "schedule.resume", schedule)
    return schedule


def delete(session: Session, principal: Principal, ref: str) -> None:
    principal.require("agents:write")
    schedule = get(session, principal, ref, lock=True)
    session.delete(schedule)
    session.flush()
    _audit(session, principal, "schedule.delete", schedule)


def list_schedules(
    session: Session, principal: Principal, *, offset: int, limit: int
) -> tuple[list[Schedule], int]:
    query = select(Schedule).where(Schedule.org_id == principal.org_id)
    return page(session, query, Schedule.created_at.desc(), Schedule.id, offset=offset, limit=limit)


def present(schedule: Schedule) -> dict[str, Any]:
    return {
        "id": schedule.id,
        "name": schedule.name,
        "target": _target_of(schedule),
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "input": schedule.input,
        "enabled": schedule.enabled,
        "overlap": schedule.overlap,
        "catchup": schedule.catchup,
        "catchup_window_seconds": schedule.catchup_window_seconds,
        "pause_after_failures": schedule.pause_after_failures,
        "consecutive_failures": schedule.consecutive_failures,
        "next_fire_at": schedule.next_fire_at,
        "last_fire_at": schedule.last_fire_at,
        "last_execution_id": schedule.last_execution_id,
        "paused_reason": schedule.paused_reason,
        "created_at": schedule.created_at,
        "updated_at": schedule.updated_at,
        "created_by": schedule.created_by,
    }


_HISTORY = text(
    """
    SELECT f.fire_time, f.fired_at, f.kind, f.status, f.skipped_reason, f.execution_id,
           f.chain_execution_id, coalesce(e.status, ce.status) AS execution_status
    FROM schedule_fires f
    LEFT JOIN executions e ON e.id = f.execution_id
    LEFT JOIN chain_executions ce ON ce.id = f.chain_execution_id
    WHERE f.schedule_id = :id
    ORDER BY f.fire_time DESC
    OFFSET :offset LIMIT :limit
    """
)


def history(
    session: Session, principal: Principal, ref: str, *, offset: int, limit: int
) -> tuple[list[dict[str, Any]], int]:
    schedule = get(session, principal, ref)
    total = session.scalar(select(func.count()).where(ScheduleFire.schedule_id == schedule.id))
    rows = session.execute(
        _HISTORY, {"id": schedule.id, "offset": offset, "limit": limit}
    ).mappings()
    return [dict(row) for row in rows], total or 0


def trigger_now(session: Session, principal: Principal, ref: str) -> tuple[dict, runs.Launched]:
    """Fire once, now, whatever the cron, the overlap policy or a pause say. The caller commits,
    then publishes what this returns."""
    principal.require("executions:submit")
    schedule = get(session, principal, ref, lock=True)
    conn = session.connection()
    run_id = uuid.uuid4()
    if schedule.chain_id is not None:
        launch: runs.Launch | runs.ChainLaunch = runs.chain_launch(
            conn,
            schedule.org_id,
            schedule.chain_id,
            schedule.target_version,
            schedule.input,
            run_id,
        )
    else:
        spec = runs.spec_for(conn, schedule.agent_id, schedule.version_id)
        errors = spec.input_errors(schedule.input)
        if errors:
            raise ValidationFailed(
                "the schedule's input no longer matches the agent's input_schema",
                errors=errors,
                hint=f"PATCH the schedule's input; GET /api/v1/agents/{spec.agent_name} shows "
                "the input_schema",
            )
        launch = runs.Launch(run_id, schedule.org_id, spec, schedule.input)
    quotas.admit(conn, schedule.org_id, executions=1)
    launched = runs.launch(conn, [launch])
    chain = isinstance(launch, runs.ChainLaunch)
    now = utcnow()
    fire = ScheduleFire(
        schedule_id=schedule.id,
        org_id=schedule.org_id,
        fire_time=now,
        fired_at=now,
        kind="manual",
        status="fired",
        execution_id=None if chain else run_id,
        chain_execution_id=run_id if chain else None,
        fired_by="api",
    )
    session.add(fire)
    schedule.last_execution_id = run_id
    schedule.last_fire_at = now
    session.flush()
    _audit(
        session,
        principal,
        "schedule.trigger",
        schedule,
        [{"op": "add", "path": "/last_execution_id", "value": str(run_id)}],
    )
    entry = {
        "fire_time": now,
        "fired_at": now,
        "kind": "manual",
        "status": "fired",
        "skipped_reason": None,
        "execution_id": fire.execution_id,
        "chain_execution_id": fire.chain_execution_id,
        "execution_status": "queued",
    }
    return entry, launched
