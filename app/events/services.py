"""Events sent to an organization: accepted once per id, resuming the waits they match and
starting the targets of event triggers, all in one transaction.

    accept(session, principal, name, data, event_id=None) -> the 202 answer (commits)
    emit(conn, org_id, name, data, created_by) -> Emitted   (Runyard's own events)
    list_events(...), get(...), present(event)
    release_dedupe_keys(conn, batch), delete_expired(conn, days, batch)   (beat's housekeeping)

Dedupe: the sender's `id` is the row's `dedupe_key`, unique per organization while it is set.
A second event with the id conflicts with the first (INSERT ... ON CONFLICT DO NOTHING); when
the first is still within DEDUPE_WINDOW, the second is a duplicate: answered 202 with the
first's id and `duplicate: true`, and nothing is written, resumed or started. When the first
is older, its key is cleared and the second is inserted (housekeeping clears such keys too,
so the table keeps few). Two senders racing with one id: the unique index makes the second
insert wait for the first's transaction, then find its row.

Nothing is published before the commit: the resumed executions and the started runs go to
the broker after it (at the request's commit under an Idempotency-Key), so a 202 always
means the event and everything it did is stored; a failure before then (PostgreSQL down: 503)
leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, or_, select, text
from sqlalchemy.orm import Session

from app import runs, storable
from app.audit import services as audit
from app.db import db, page
from app.durable import waits
from app.errors import NotFound, ValidationFailed
from app.events.models import Event
from app.orgs.services import Principal
from app.triggers.on_event import NAME, NAME_PATTERN, fire_for_event

MAX_DATA_BYTES = 256 * 1024
MAX_ID_CHARS = 200
DEDUPE_WINDOW = dt.timedelta(hours=24)
LIST_HINT = "GET /api/v1/events lists the organization's events, newest first"
# Names of the events Runyard sends itself (`runyard.decision`: app/wallets); a client's
# POST /api/v1/events may not use them, so that none can pass for an approval.
INTERNAL_PREFIX = "runyard."


# ---------------------------------------------------------------------------------------------
# Checks


def _serialized(data: Any) -> str:
    """The data as JSON text, once checked: an object, storable, within MAX_DATA_BYTES."""
    if not isinstance(data, dict):
        raise ValidationFailed(
            "the event's data must be a JSON object",
            errors={"/data": ["not an object"]},
            hint='send {"name": ..., "data": {...}}',
        )
    try:
        text_form = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        size = len(text_form.encode("utf-8"))
    except (ValueError, UnicodeEncodeError):
        text_form, size = "", 0
    # NaN/Infinity (ValueError), a lone surrogate (no UTF-8), U+0000 (always written escaped):
    # found by pointer. Only suspected data is walked; a false alarm walks and finds nothing.
    if not text_form or "\\u0000" in text_form:
        storable.refuse({f"/data{k}": v for k, v in storable.document_problems(data).items()})
    if size > MAX_DATA_BYTES:
        raise ValidationFailed(
            f"the event's data is {size} bytes as JSON, over the {MAX_DATA_BYTES} allowed",
            errors={"/data": [f"at most {MAX_DATA_BYTES} bytes as JSON"]},
            hint="send a reference to large content (a URL, a document id), not the content",
        )
    return text_form


def _check(name: Any, event_id: Any) -> None:
    errors: dict[str, list[str]] = {}
    if not isinstance(name, str) or not NAME.match(name):
        errors["/name"] = [f"must match {NAME_PATTERN}"]
    if event_id is not None and (
        not isinstance(event_id, str) or not 1 <= len(event_id) <= MAX_ID_CHARS
    ):
        errors["/id"] = [f"1 to {MAX_ID_CHARS} characters"]
    elif event_id is not None and storable.problem(event_id):
        errors["/id"] = [str(storable.problem(event_id))]
    if errors:
        raise ValidationFailed(
            "the event is malformed",
            errors=errors,
            hint="a name of letters, digits and _ . : - (up to 200), an id of up to 200 characters",
        )


# ---------------------------------------------------------------------------------------------
# Accepting

_INSERT = text(
    """
    INSERT INTO events (id, org_id, event_id, name, data, dedupe_key,
                        created_by_token_id, created_by_token_name)
    VALUES (:id, :org_id, :event_id, :name, CAST(:data AS jsonb), :dedupe_key,
            :token_id, :token_name)
    ON CONFLICT (org_id, dedupe_key) DO NOTHING
    RETURNING received_at
    """
)
_FIRST = text(
    """
    SELECT id, event_id, name, received_at,
           received_at >= now() - CAST(:window AS interval) AS fresh
    FROM events WHERE org_id = :org_id AND dedupe_key = :key
    """
)
_RELEASE = text("UPDATE events SET dedupe_key = NULL WHERE id = :id AND dedupe_key = :key")
_DELIVERED = text(
    """
    UPDATE events SET resumed = CAST(:resumed AS uuid[]), started = CAST(:started AS jsonb)
    WHERE id = :id
    """
)
# Each try inserts, or finds the row it conflicts with (a race may clear or delete that row in
# between: try again).
CLAIM_TRIES = 5


def _claim(
    conn: Connection, org_id: uuid.UUID, row: dict[str, Any]
) -> dt.datetime | dict[str, Any]:
    """Insert the event: its received_at; or the first event's answer when it is a duplicate."""
    window = f"{int(DEDUPE_WINDOW.total_seconds())} seconds"
    for _ in range(CLAIM_TRIES):
        inserted = conn.execute(_INSERT, row).scalar()
        if inserted is not None:
            return inserted
        first = (
            conn.execute(_FIRST, {"org_id": org_id, "key": row["dedupe_key"], "window": window})
            .mappings()
            .first()
        )
        if first is None:
            continue
        if first["fresh"]:
            return {
                "id": first["id"],
                "event_id": first["event_id"],
                "name": first["name"],
                "received_at": first["received_at"],
                "resumed": [],
                "started": [],
                "duplicate": True,
            }
        # Older than the window and not yet cleared by housekeeping: the id is free again.
        conn.execute(_RELEASE, {"id": first["id"], "key": row["dedupe_key"]})
    raise RuntimeError(f"event id {row['dedupe_key']!r} kept conflicting")


def _audited(name: str, event_id: str, data_text: str, resumed: list, started: list) -> list:
    """What the audit event says: the data's size and hash, never its content."""
    data = data_text.encode("utf-8")
    return [
        {"op": "add", "path": "/event_id", "value": event_id},
        {"op": "add", "path": "/name", "value": name},
        {
            "op": "add",
            "path": "/data",
            "value": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        },
        {"op": "add", "path": "/resumed", "value": resumed},
        {"op": "add", "path": "/started", "value": started},
    ]


def _publish_resumed(woken: list) -> None:
    with db.hot() as conn:
        waits.publish_resumed(conn, woken)


def _deliver(conn: Connection, org_id: uuid.UUID, row: dict[str, Any], data: dict[str, Any]):
    """Store the event and do what it does, in the caller's transaction: its received_at (or
    the first event's answer for a duplicate), the rows it woke and what it started."""
    claimed = _claim(conn, org_id, row)
    if isinstance(claimed, dict):
        return claimed, [], None
    woken = waits.resume_for_event(conn, org_id, row["id"], row["name"], data, claimed)
    event = {**row, "data": data, "received_at": claimed}
    fired = fire_for_event(conn, org_id, event)
    conn.execute(
        _DELIVERED,
        {
            "id": row["id"],
            "resumed": list(waits.resumed_ids(woken)),
            "started": json.dumps(json.loads(json.dumps(fired.started, default=str))),
        },
    )
    return claimed, woken, fired


def _publish_after_commit(woken: list, fired: Any) -> None:
    # After the commit (at the request's, under an Idempotency-Key): never for a rollback.
    if woken:
        db.after_commit(_publish_resumed, woken)
    runs.publish_after_commit(fired.launched)


def accept(
    session: Session,
    principal: Principal,
    name: str,
    data: dict[str, Any],
    event_id: str | None = None,
) -> dict[str, Any]:
    """Accept one event: in one transaction, dedupe it, store it, resume the waits it matches,
    start the targets of the event triggers it matches, record what it did and one audit event
    (`event.send`); commit; then publish. A duplicate (the same id within 24 hours) writes
    nothing and answers the first event's id with `duplicate: true`."""
    principal.require("executions:submit")
    _check(name, event_id)
    if name.startswith(INTERNAL_PREFIX):
        raise ValidationFailed(
            f"event names starting with {INTERNAL_PREFIX!r} are Runyard's own",
            errors={"/name": [f"must not start with {INTERNAL_PREFIX!r}"]},
            hint="choose another name; Runyard sends those events itself (a decision's "
            "approval, for one)",
        )
    data_text = _serialized(data)
    conn = session.connection()
    event_pk = uuid.uuid4()
    row = {
        "id": event_pk,
        "org_id": principal.org_id,
        "event_id": event_id if event_id is not None else str(event_pk),
        "name": name,
        "data": data_text,
        "dedupe_key": event_id,
        "token_id": principal.token_id,
        "token_name": principal.token_name,
    }
    received_at, woken, fired = _deliver(conn, principal.org_id, row, data)
    if fired is None:
        return received_at
    resumed = waits.resumed_ids(woken)
    started = json.loads(json.dumps(fired.started, default=str))
    audit.record(
        conn,
        audit.Actor.of(principal),
        audit.Change(
            "event.send",
            "event",
            event_pk,
            name,
            _audited(name, row["event_id"], data_text, [str(i) for i in resumed], started),
        ),
    )
    session.commit()
    _publish_after_commit(woken, fired)
    return {
        "id": event_pk,
        "event_id": row["event_id"],
        "name": name,
        "received_at": received_at,
        "resumed": list(resumed),
        "started": fired.started,
        "duplicate": False,
    }


@dataclass(frozen=True)
class Emitted:
    """What an event Runyard sent did: publish it once the caller's transaction committed."""

    woken: list
    fired: Any

    @property
    def resumed(self) -> list[uuid.UUID]:
        return waits.resumed_ids(self.woken)

    def publish_after_commit(self) -> None:
        _publish_after_commit(self.woken, self.fired)


def emit(
    conn: Connection,
    org_id: uuid.UUID,
    name: str,
    data: dict[str, Any],
    created_by: dict[str, Any],
) -> Emitted:
    """An event Runyard sends itself (a name under INTERNAL_PREFIX), in the caller's
    transaction, by the same path as POST /api/v1/events: stored, resuming the waits it
    matches and starting the event triggers' targets. The caller writes the audit event of
    the change that sent it, commits, then calls `publish_after_commit` on the answer."""
    event_pk = uuid.uuid4()
    row = {
        "id": event_pk,
        "org_id": org_id,
        "event_id": str(event_pk),
        "name": name,
        "data": _serialized(data),
        "dedupe_key": None,
        "token_id": created_by["token_id"],
        "token_name": created_by["token_name"],
    }
    _received_at, woken, fired = _deliver(conn, org_id, row, data)
    return Emitted(woken, fired)


# ---------------------------------------------------------------------------------------------
# Reading


def list_events(
    session: Session,
    principal: Principal,
    *,
    name: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    offset: int,
    limit: int,
) -> tuple[list[Event], int]:
    query = select(Event).where(Event.org_id == principal.org_id)
    if name is not None:
        query = query.where(Event.name == name)
    if since is not None:
        query = query.where(Event.received_at >= since)
    if until is not None:
        query = query.where(Event.received_at < until)
    return page(
        session, query, Event.received_at.desc(), Event.id.desc(), offset=offset, limit=limit
    )


def get(session: Session, principal: Principal, ref: str) -> Event:
    """By the event's id, or else by the sender's id (the newest event with it)."""
    query = select(Event).where(Event.org_id == principal.org_id)
    try:
        pk = uuid.UUID(ref)
    except ValueError:
        query = query.where(Event.event_id == ref)
        order = [Event.received_at.desc()]
    else:
        query = query.where(or_(Event.id == pk, Event.event_id == ref))
        order = [(Event.id == pk).desc(), Event.received_at.desc()]
    found = session.scalar(query.order_by(*order).limit(1))
    if found is None:
        raise NotFound(f"no event {ref[:200]!r}", hint=LIST_HINT)
    return found


def present(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "event_id": event.event_id,
        "name": event.name,
        "data": event.data,
        "received_at": event.received_at,
        "resumed": event.resumed,
        "started": event.started,
        "created_by": event.created_by,
    }


# ---------------------------------------------------------------------------------------------
# Housekeeping (beat)

_RELEASE_OLD_KEYS = text(
    """
    UPDATE events SET dedupe_key = NULL
    WHERE id IN (SELECT id FROM events
                 WHERE dedupe_key IS NOT NULL AND received_at < :before
                 ORDER BY received_at LIMIT :limit FOR UPDATE SKIP LOCKED)
    """
)
_DELETE_EXPIRED = text(
    """
    DELETE FROM events
    WHERE id IN (SELECT id FROM events WHERE received_at < :before
                 ORDER BY received_at LIMIT :limit FOR UPDATE SKIP LOCKED)
    """
)


def release_dedupe_keys(conn: Connection, batch: int) -> int:
    """Clear the dedupe keys of up to `batch` events past the window: their ids are free."""
    before = dt.datetime.now(dt.UTC) - DEDUPE_WINDOW
    return conn.execute(_RELEASE_OLD_KEYS, {"before": before, "limit": batch}).rowcount


def delete_expired(conn: Connection, retention_days: int, batch: int) -> int:
    """Delete up to `batch` events older than `retention_days` (0: keep them)."""
    if retention_days <= 0:
        return 0
    before = dt.datetime.now(dt.UTC) - dt.timedelta(days=retention_days)
    return conn.execute(_DELETE_EXPIRED, {"before": before, "limit": batch}).rowcount
