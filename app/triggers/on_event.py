"""Event triggers: `POST /api/v1/triggers` with `on_event` instead of a webhook.

An event trigger has no secret and no /hooks URL. Each event the organization accepts
(app/events/services.py) starts the target of every trigger on the event's name whose
`filter` matches (each dotted path in the event's data equals its value; no filter matches
every event of the name). The trigger's `input` may refer to the event as `$.event...`:

    $.event.data.<path>     the event's data      $.event.name   its name
    $.event.id              the event's id        $.event.event_id   the sender's id
    $.event.received_at     when it was accepted (ISO 8601)

One trigger's failure never fails the event: a reference that finds nothing, an input its
target refuses, an archived target, a quota or concurrency limit that refuses the run leave an
entry `{"trigger_id", "error": {"type", "message", "hint"}}` in the event's `started`, and the
other triggers start theirs. Each target starts in a savepoint of its own, so a refused one
leaves nothing behind.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, text

from app import runs
from app.errors import Conflict, QuotaExceeded, RunyardError, ValidationFailed, json_pointer
from app.flow import quotas
from app.triggers.references import references_in, render
from app.triggers.targets import launch_for

NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
NAME = re.compile(NAME_PATTERN)
# A dotted path in the event's data: keys (or list indexes) joined by dots.
FILTER_PATH_PATTERN = r"^[^.]{1,200}(\.[^.]{1,200}){0,31}$"
FILTER_PATH = re.compile(FILTER_PATH_PATTERN)
MAX_FILTER_KEYS = 32
# What `$.event` holds for an event trigger's input (anything else never resolves).
EVENT_FIELDS = ("id", "event_id", "name", "data", "received_at")
ERROR_MESSAGE_CHARS = 2000


# ---------------------------------------------------------------------------------------------
# Filters


def check_filter(event_filter: dict[str, Any]) -> None:
    """422 for a filter whose keys are no dotted paths."""
    errors = {
        json_pointer(("on_event", "filter", path)): [
            "not a dotted path (keys joined by dots, none empty)"
        ]
        for path in event_filter
        if not FILTER_PATH.match(path)
    }
    if len(event_filter) > MAX_FILTER_KEYS:
        errors["/on_event/filter"] = [f"at most {MAX_FILTER_KEYS} paths"]
    if errors:
        raise ValidationFailed(
            "the event filter is malformed",
            errors=errors,
            hint='map a dotted path in the event\'s data to a value, e.g. {"order.currency": '
            '"EUR"}',
        )


_MISSING = object()


def _at(data: Any, path: str) -> Any:
    """What a dotted path names in the data (a digit segment indexes a list), or _MISSING."""
    node = data
    for segment in path.split("."):
        if isinstance(node, dict) and segment in node:
            node = node[segment]
        elif isinstance(node, list) and segment.isdigit() and int(segment) < len(node):
            node = node[int(segment)]
        else:
            return _MISSING
    return node


def same_json(left: Any, right: Any) -> bool:
    """Equal as JSON values: true is not 1, 1 is 1.0, objects and arrays compared deeply."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same_json(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(same_json, left, right))
    return type(left) is type(right) and left == right


def matches(event_filter: dict[str, Any] | None, data: dict[str, Any]) -> bool:
    return all(
        (found := _at(data, path)) is not _MISSING and same_json(found, expected)
        for path, expected in (event_filter or {}).items()
    )


def check_event_references(template: dict[str, Any]) -> None:
    """422 for a reference no event can resolve (`$.event.foo`): an event trigger's `$.event`
    holds only EVENT_FIELDS."""
    errors = {
        pointer: [f"{reference!r}: $.event holds only {', '.join(EVENT_FIELDS)}"]
        for pointer, reference, path in references_in(template)
        if path and path[0] not in EVENT_FIELDS
    }
    if errors:
        raise ValidationFailed(
            "the input refers to what an event does not hold",
            errors=errors,
            hint="refer to the event's data as $.event.data.<path>, e.g. $.event.data.order_id",
        )


# ---------------------------------------------------------------------------------------------
# Firing


@dataclass
class Fired:
    """What one event started: `started` for the event's row and answer, `launched` to
    publish once the caller has committed."""

    started: list[dict[str, Any]] = field(default_factory=list)
    launched: runs.Launched = field(default_factory=runs.Launched)

    def add(self, launched: runs.Launched) -> None:
        self.launched.dispatches.extend(launched.dispatches)
        self.launched.chain_runs.extend(launched.chain_runs)
        self.launched.let_out.extend(launched.let_out)


_ON_EVENT = text(
    """
    SELECT id, agent_id, chain_id, version_id, target_version, input, event_filter
    FROM triggers
    WHERE org_id = :org_id AND event_name = :name
    ORDER BY created_at, id
    """
)


def scope(event: dict[str, Any]) -> dict[str, Any]:
    """`$.event` for the triggers' inputs."""
    received_at = event.get("received_at")
    return {
        "id": str(event["id"]),
        "event_id": event.get("event_id"),
        "name": event["name"],
        "data": event["data"],
        "received_at": received_at.isoformat() if received_at is not None else None,
    }


def _error(kind: str, exc: RunyardError) -> dict[str, Any]:
    details = "; ".join(
        f"{pointer}: {', '.join(map(str, problems)) if isinstance(problems, list) else problems}"
        for pointer, problems in exc.errors.items()
    )
    message = f"{exc.message} ({details})" if details else exc.message
    return {
        "type": kind,
        "message": message[:ERROR_MESSAGE_CHARS],
        "hint": exc.hint or "GET /api/v1/triggers/{id} shows the trigger",
    }


def _kind(exc: RunyardError) -> str:
    if isinstance(exc, QuotaExceeded):
        return "quota_exceeded"
    if isinstance(exc, Conflict):
        return "conflict"
    if isinstance(exc, ValidationFailed):
        return "invalid_input"
    return "refused"


def _start(conn: Connection, org_id: uuid.UUID, trigger: Any, payload: Any) -> dict[str, Any]:
    """Start one trigger's target in a savepoint: its entry of `started` and what to publish."""
    run_id = uuid.uuid4()
    with conn.begin_nested():
        launch = launch_for(
            conn,
            org_id,
            agent_id=trigger.agent_id,
            chain_id=trigger.chain_id,
            version_id=trigger.version_id,
            target_version=trigger.target_version,
            payload=payload,
            run_id=run_id,
        )
        quotas.admit(conn, org_id, executions=1)
        launched = runs.launch(conn, [launch])
    run = "chain_execution_id" if trigger.chain_id is not None else "execution_id"
    return {"entry": {"trigger_id": trigger.id, run: run_id}, "launched": launched}


def fire_for_event(conn: Connection, org_id: uuid.UUID, event: dict[str, Any]) -> Fired:
    """Start the target of each of the organization's triggers on this event (`event`: its
    `id`, `event_id`, `name`, `data`, `received_at`), in the caller's transaction; the caller
    commits, then publishes `Fired.launched` (runs.publish_after_commit)."""
    fired = Fired()
    rows = conn.execute(_ON_EVENT, {"org_id": org_id, "name": event["name"]}).all()
    if not rows:
        return fired
    event_scope = scope(event)
    for trigger in rows:
        if not matches(trigger.event_filter, event["data"]):
            continue
        try:
            payload = render(trigger.input, event_scope)
        except ValidationFailed as exc:
            fired.started.append(
                {"trigger_id": trigger.id, "error": _error("reference_not_found", exc)}
            )
            continue
        try:
            started = _start(conn, org_id, trigger, payload)
        except RunyardError as exc:
            fired.started.append({"trigger_id": trigger.id, "error": _error(_kind(exc), exc)})
            continue
        fired.started.append(started["entry"])
        fired.add(started["launched"])
    return fired
