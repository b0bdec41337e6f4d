"""The audit trail: one hash-chained event per state-changing API request and admin command.

Each event is written by the statement (or in the transaction) that makes the change it
records, so a change and its event commit or vanish together. The event is a canonical JSON
document (`body`: sorted keys, no spaces, ASCII) of `seq`, `at`, `actor`, `action`, `object`,
`request_id`, `ip`, `changes` and `prev_hash`; `hash` is the hex SHA-256 of `prev_hash`
followed by `body`.

Written, an event is unsealed: everything is rendered but `seq` and `prev_hash`, which only
exist in commit order. The sealer (`seal`: beat every AUDIT_SEAL_SECONDS, and every reader
first) numbers an organization's committed unsealed events in order, completes their bodies and
chains their hashes from the organization's head, under the head's row lock. Numbering at write
time instead held that lock from the write to the commit: every submit of an organization
waited for the one before it to reach the disk (group commit lost; bench/audit.py measured 8
concurrent submitters going from 1,180 to 420 a second). So seq has no gaps, and the hot path
pays one INSERT in the statement it runs anyway.

What the chain proves: a sealed event changed, removed from the middle or inserted, and a tail
cut off without moving the head, are found by `verify`. What it cannot prove alone: that
nobody who can write every table rewrote the whole chain and its head; compare a head exported
earlier (`runyard audit head`) with `verify --anchor` for that. An event is only chained once
sealed, about a second after its commit: until then it could be changed unseen.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonpatch
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from app.audit.models import GENESIS, AuditEvent, AuditHead
from app.db import db, driver, page

# ---------------------------------------------------------------------------------------------
# Who and where


class Caller(Protocol):
    """What an actor is made from: app.orgs.services.Principal (named by shape, not imported:
    the audit trail sits below the organizations' layer)."""

    org_id: uuid.UUID
    token_id: uuid.UUID
    token_name: str
    role: str


@dataclass(frozen=True)
class Actor:
    """Who made a change: a token, or an operating-system user at the server's command line."""

    org_id: uuid.UUID
    document: dict[str, Any]
    key: str  # what the `actor` filter matches: the token id, or "cli:<user>"

    @classmethod
    def of(cls, caller: Caller) -> Actor:
        return cls(
            caller.org_id,
            {
                "token_id": str(caller.token_id),
                "token_name": caller.token_name,
                "role": caller.role,
            },
            str(caller.token_id),
        )

    @classmethod
    def cli(cls, org_id: uuid.UUID) -> Actor:
        user = _os_user()
        return cls(org_id, {"cli": user}, f"cli:{user}")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (containers)
        import os

        return str(os.getuid())


def created_by(caller: Caller | None) -> dict[str, Any]:
    """The `created_by_*` columns of a row a caller makes (both None for the system)."""
    if caller is None:
        return {"created_by_token_id": None, "created_by_token_name": None}
    return {"created_by_token_id": caller.token_id, "created_by_token_name": caller.token_name}


def shown_created_by(token_id: uuid.UUID | None, token_name: str | None) -> dict | None:
    return None if token_id is None else {"token_id": token_id, "token_name": token_name}


@dataclass(frozen=True)
class Origin:
    """Where the request came from: set by the HTTP edge for the length of one request."""

    request_id: str | None = None
    ip: str | None = None


_origin: ContextVar[Origin | None] = ContextVar("runyard_audit_origin", default=None)


def begin_origin(request_id: str | None, ip: str | None) -> None:
    _origin.set(Origin(request_id, ip))


def end_origin() -> None:
    _origin.set(None)


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class Change:
    """An event to write: what was done to which object (`changes`: RFC 6902 operations)."""

    action: str
    object_type: str
    object_id: Any
    object_name: str | None = None
    changes: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Prepared:
    """An event rendered but for its seq and prev_hash: the parameters of RECORD_SQL."""

    params: dict[str, Any] = field(default_factory=dict)


def canonical(document: Any) -> str:
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str
    )


def _timestamp(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def prepare(actor: Actor, change: Change) -> Prepared:
    origin = _origin.get()
    at = dt.datetime.now(dt.UTC)
    before_prev = {
        "action": change.action,
        "actor": actor.document,
        "at": _timestamp(at),
        "changes": change.changes,
        "ip": origin.ip if origin else None,
        "object": {
            "type": change.object_type,
            "id": None if change.object_id is None else str(change.object_id),
            "name": change.object_name,
        },
    }
    # Sorted keys: everything above, then prev_hash, request_id, seq. The two PostgreSQL fills
    # in go between `head`, `mid` and the closing brace.
    head = canonical(before_prev)[:-1] + ',"prev_hash":"'
    mid = '","request_id":' + canonical(origin.request_id if origin else None) + ',"seq":'
    return Prepared(
        {
            "audit_org": actor.org_id,
            "audit_at": at,
            "audit_action": change.action,
            "audit_object_type": change.object_type,
            "audit_object_id": before_prev["object"]["id"],
            "audit_actor": actor.key,
            "audit_head": head,
            "audit_mid": mid,
        }
    )


_WRITE_EVENT = """INSERT INTO audit_events (org_id, at, action, object_type, object_id, actor,
                              draft_head, draft_mid)
    SELECT %(audit_org)s, %(audit_at)s, %(audit_action)s, %(audit_object_type)s,
           %(audit_object_id)s, %(audit_actor)s, %(audit_head)s, %(audit_mid)s"""

RECORD_SQL = _WRITE_EVENT


def cte_when(condition: str) -> str:
    """The event's CTE for a statement of the caller's, written only when `condition` (SQL)
    holds: `WITH ..., <this> <the caller's statement>`."""
    return f"audit_written AS ({_WRITE_EVENT} WHERE {condition})"


def snapshot(shown: dict[str, Any]) -> dict[str, Any]:
    """An object as an answer shows it, less the times every change moves: what an update's
    changes are computed between."""
    return {key: value for key, value in shown.items() if key not in ("created_at", "updated_at")}


def changes_between(before: Any, after: Any) -> list[dict[str, Any]]:
    """RFC 6902 operations that turn `before` into `after` (ids and times as strings)."""
    return jsonpatch.make_patch(json.loads(canonical(before)), json.loads(canonical(after))).patch


def record(conn: Connection | Session, actor: Actor, change: Change) -> None:
    """Write one event in the caller's transaction (an ORM session: its connection)."""
    connection = conn.connection() if isinstance(conn, Session) else conn
    driver(connection).execute(RECORD_SQL, prepare(actor, change).params)


# ---------------------------------------------------------------------------------------------
# Sealing

SEAL_BATCH = 5000


def seal(conn: Connection, org_id: uuid.UUID) -> int:
    """Number, complete and hash the organization's committed unsealed events, oldest written
    first, under its head's row lock (a concurrent sealer of the same organization waits, then
    finds them sealed); how many. In its own transaction, or a savepoint of the caller's."""
    sealed = 0
    raw = driver(conn)
    while True:
        with raw.transaction():
            head = raw.execute(
                "SELECT seq, hash FROM audit_heads WHERE org_id = %s FOR UPDATE", (org_id,)
            ).fetchone()
            if head is None:  # the organization is gone
                return sealed
            pending = raw.execute(
                "SELECT id, draft_head, draft_mid FROM audit_events "
                "WHERE org_id = %s AND seq IS NULL ORDER BY id LIMIT %s",
                (org_id, SEAL_BATCH),
            ).fetchall()
            if not pending:
                return sealed
            seq, hashed = head
            ids, seqs, bodies, hashes = [], [], [], []
            for event_id, draft_head, draft_mid in pending:
                prev_hash, seq = hashed, seq + 1
                body = f"{draft_head}{prev_hash}{draft_mid}{seq}}}"
                hashed = hashlib.sha256((prev_hash + body).encode()).hexdigest()
                ids.append(event_id)
                seqs.append(seq)
                bodies.append(body)
                hashes.append(hashed)
            raw.execute(
                "UPDATE audit_events e SET seq = s.seq, body = s.body, hash = s.hash, "
                "draft_head = NULL, draft_mid = NULL "
                "FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::text[]) "
                "AS s(id, seq, body, hash) WHERE e.id = s.id",
                (ids, seqs, bodies, hashes),
            )
            raw.execute(
                "UPDATE audit_heads SET prev_hash = %s, hash = %s, seq = %s WHERE org_id = %s",
                (prev_hash, hashed, seq, org_id),
            )
        sealed += len(pending)
        if len(pending) < SEAL_BATCH:
            return sealed


def seal_now(org_id: uuid.UUID) -> int:
    """Seal in a transaction of its own, committed before the caller reads: a reader must not
    show seqs that its own rollback would take back. Call it before the caller's session runs
    its first query (in a test, or a keyed request, that session is a savepoint the seal must
    not land inside)."""
    with db.begin() as conn:
        return seal(conn, org_id)


def seal_all(conn: Connection) -> int:
    """Seal every organization's committed unsealed events (beat's housekeeping); how many."""
    orgs = [
        row[0]
        for row in driver(conn).execute(
            "SELECT DISTINCT org_id FROM audit_events WHERE seq IS NULL"
        )
    ]
    return sum(seal(conn, org_id) for org_id in orgs)


# ---------------------------------------------------------------------------------------------
# Reading


def list_events(
    session: Session,
    org_id: uuid.UUID,
    *,
    action: str | None = None,
    object_type: str | None = None,
    object_id: str | None = None,
    actor: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    offset: int,
    limit: int,
) -> tuple[list[dict[str, Any]], int]:
    """An organization's events, newest first: sealed first, so that every event committed
    before the call is listed with its seq."""
    seal_now(org_id)
    query = select(AuditEvent).where(AuditEvent.org_id == org_id, AuditEvent.seq.is_not(None))
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if object_type is not None:
        query = query.where(AuditEvent.object_type == object_type)
    if object_id is not None:
        query = query.where(AuditEvent.object_id == object_id)
    if actor is not None:
        query = query.where(AuditEvent.actor.in_([actor, f"cli:{actor}"]))
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if until is not None:
        query = query.where(AuditEvent.at < until)
    events, total = page(session, query, AuditEvent.seq.desc(), offset=offset, limit=limit)
    return [{**json.loads(event.body), "hash": event.hash} for event in events], total


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str


def head(session: Session, org_id: uuid.UUID) -> Head:
    row = session.get(AuditHead, org_id)
    return Head(0, GENESIS) if row is None else Head(row.seq, row.hash)


# ---------------------------------------------------------------------------------------------
# Verifying


@dataclass(frozen=True)
class Verdict:
    """`bad_seq` is None when the chain holds (`count` events checked)."""

    count: int
    bad_seq: int | None = None
    reason: str | None = None


def _events(session: Session, org_id: uuid.UUID) -> Iterator[AuditEvent]:
    query = (
        select(AuditEvent)
        .where(AuditEvent.org_id == org_id, AuditEvent.seq.is_not(None))
        .order_by(AuditEvent.seq)
    )
    yield from session.scalars(query.execution_options(yield_per=1000))


def _problem(event: AuditEvent, expected_seq: int, prev_hash: str) -> tuple[int, str] | None:
    """What is wrong with `event`, found where `expected_seq` chaining to `prev_hash` was due:
    (the seq to name, why), or None."""
    if event.seq != expected_seq:
        if event.seq > expected_seq:
            return expected_seq, f"missing: the chain jumps from {expected_seq - 1} to {event.seq}"
        return event.seq, "out of order"
    try:
        document = json.loads(event.body)
    except ValueError:
        return event.seq, "changed: its body is not JSON"
    if canonical(document) != event.body:
        return event.seq, "changed: its body is not in canonical form"
    if document.get("seq") != event.seq:
        return event.seq, "changed or inserted: its body names another seq"
    if document.get("prev_hash") != prev_hash:
        return (
            event.seq,
            "removed or inserted before it: prev_hash is not the hash of the one before",
        )
    if hashlib.sha256((prev_hash + event.body).encode()).hexdigest() != event.hash:
        return event.seq, "changed: the hash does not match its content"
    obj = document.get("object") or {}
    if (
        document.get("action") != event.action
        or obj.get("type") != event.object_type
        or obj.get("id") != event.object_id
        or document.get("at") != _timestamp(event.at)
    ):
        return event.seq, "changed: its columns disagree with its hashed body"
    return None


def verify(session: Session, org_id: uuid.UUID, anchor: Head | None = None) -> Verdict:
    """Walk the chain from seq 1. `anchor`: a head exported earlier, which must still be on it
    (catches a chain rewritten whole, head included)."""
    seal_now(org_id)
    prev_hash, expected = GENESIS, 1
    anchored = anchor is None or anchor.seq == 0
    for event in _events(session, org_id):
        problem = _problem(event, expected, prev_hash)
        if problem is not None:
            return Verdict(expected - 1, *problem)
        if anchor is not None and event.seq == anchor.seq:
            if event.hash != anchor.hash:
                return Verdict(expected - 1, event.seq, "differs from the anchor: rewritten")
            anchored = True
        prev_hash, expected = event.hash, expected + 1
    count = expected - 1
    current = head(session, org_id)
    if current.seq != count or current.hash != prev_hash:
        # The events end before the head says they do: the last ones were removed.
        return Verdict(count, count + 1, f"removed: the head is at seq {current.seq}")
    if not anchored:
        return Verdict(count, anchor.seq, "the anchor's seq is past the end of the chain")
    return Verdict(count)
