"""Triggers: webhook triggers, which outside systems fire with a signed POST /hooks/<id>, and
event triggers (`on_event`, on_event.py), which events sent to POST /api/v1/events fire. Both
start a target (an agent or a chain) with their `input`, its `$.event...` references
(references.py) replaced by parts of the event.

A delivery is accepted when it carries one of two signatures, made with the trigger's secret:
- `Runyard-Signature: t=<Unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">` (the scheme
  notifications are sent with): the timestamp is signed, so it must lie within
  TIMESTAMP_TOLERANCE of now and a captured request cannot be re-sent later with a fresh one;
- the older `X-Runyard-Signature: sha256=<hex HMAC-SHA256 of the raw body>` with
  `X-Runyard-Timestamp` (Unix seconds, or ISO 8601) within TIMESTAMP_TOLERANCE of now, still
  accepted. Its timestamp is not signed: the replay memory below is all that stops a captured
  request re-sent with a fresh timestamp, and only for REPLAY_MEMORY;
and when the signature was not accepted before. Seen signatures are rows of trigger_deliveries,
written in the same transaction as the execution they start: a delivery is either fully
accepted (remembered and run) or not at all, so a sender may retry a request that failed. Send
an event id in the body so that two genuine events never share a body.

The secret is stored sealed (app/secrets/crypto.py), with `trigger:<id>` as associated data.

Everything else answers 401 (bad or missing signature, stale timestamp, replay), 400 (a body
that is not JSON) or 422 (a `$.event...` reference that finds nothing, an input that fails the
target's input_schema), and starts nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
import uuid
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import runs, signing, storable
from app.audit import services as audit
from app.db import page, utcnow
from app.errors import (
    Conflict,
    NotFound,
    RunyardError,
    Unauthorized,
)
from app.flow import quotas
from app.orgs.services import Principal
from app.secrets.crypto import keyring, readable
from app.triggers import on_event
from app.triggers.models import Trigger
from app.triggers.references import check_template, render
from app.triggers.targets import launch_for

SIGNED_HEADER = "Runyard-Signature"
SIGNATURE_HEADER = "X-Runyard-Signature"
TIMESTAMP_HEADER = "X-Runyard-Timestamp"
TIMESTAMP_TOLERANCE = dt.timedelta(minutes=5)
REPLAY_MEMORY = dt.timedelta(hours=24)
SECRET_PREFIX = "whsec_"
SIGNING_HINT = (
    'send Runyard-Signature: t=<Unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>" with '
    "the trigger's secret>, t within 5 minutes of the server's clock (the older "
    "X-Runyard-Signature: sha256=<hex HMAC-SHA256 of the raw body> with X-Runyard-Timestamp is "
    "still accepted)"
)


# ---------------------------------------------------------------------------------------------
# Definitions


def create(
    session: Session, principal: Principal, data: dict[str, Any]
) -> tuple[Trigger, str | None]:
    """The trigger, and a webhook trigger's secret, returned once (None for an event trigger)."""
    principal.require("agents:write")
    conn = session.connection()
    target = runs.resolve(conn, principal.org_id, data["target"])
    listens = data.get("on_event")
    if listens is not None:
        on_event.check_filter(listens.get("filter") or {})
    if not check_template(data["input"]):
        runs.check_input(conn, target, data["input"])
    elif listens is not None:
        on_event.check_event_references(data["input"])
    trigger_id = uuid.uuid4()
    secret = None if listens is not None else SECRET_PREFIX + secrets.token_urlsafe(32)
    trigger = Trigger(
        id=trigger_id,
        org_id=principal.org_id,
        name=data["name"],
        target_kind=target.kind,
        target_name=target.name,
        target_version=target.version,
        agent_id=target.agent_id,
        version_id=target.version_id,
        chain_id=target.chain_id,
        input=data["input"],
        secret=None if secret is None else keyring().seal(secret, sealing_context(trigger_id)),
        event_name=None if listens is None else listens["name"],
        # An empty filter is no filter: every event of the name.
        event_filter=(listens or {}).get("filter") or None,
        created_by_token_id=principal.token_id,
        created_by_token_name=principal.token_name,
    )
    session.add(trigger)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(
            f"a trigger named {data['name']!r} exists already", hint="choose another name"
        ) from exc
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change("trigger.create", "trigger", trigger.id, trigger.name),
    )
    return trigger, secret


def get(session: Session, principal: Principal, ref: str) -> Trigger:
    query = select(Trigger).where(Trigger.org_id == principal.org_id)
    try:
        query = query.where(Trigger.id == uuid.UUID(ref))
    except ValueError:
        query = query.where(Trigger.name == ref)
    found = session.scalar(query)
    if found is None:
        raise NotFound(f"no trigger {ref!r}", hint="GET /api/v1/triggers lists them")
    return found


def list_triggers(
    session: Session, principal: Principal, *, offset: int, limit: int
) -> tuple[list[Trigger], int]:
    query = select(Trigger).where(Trigger.org_id == principal.org_id)
    return page(session, query, Trigger.created_at.desc(), Trigger.id, offset=offset, limit=limit)


def delete(session: Session, principal: Principal, ref: str) -> None:
    principal.require("agents:write")
    trigger = get(session, principal, ref)
    session.delete(trigger)
    session.flush()
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change("trigger.delete", "trigger", trigger.id, trigger.name),
    )


def present(trigger: Trigger, secret: str | None = None) -> dict[str, Any]:
    target: dict[str, Any] = {trigger.target_kind: trigger.target_name}
    if trigger.target_version:
        target["version"] = trigger.target_version
    listens = None
    if trigger.event_name is not None:
        listens = {"name": trigger.event_name, "filter": trigger.event_filter or {}}
    body = {
        "id": trigger.id,
        "name": trigger.name,
        "target": target,
        "input": trigger.input,
        "url": None if listens is not None else f"/hooks/{trigger.id}",
        "on_event": listens,
        "created_at": trigger.created_at,
        "created_by": trigger.created_by,
    }
    if secret is not None:
        body["secret"] = secret
    return body


# ---------------------------------------------------------------------------------------------
# Deliveries


def _parse_timestamp(raw: str) -> dt.datetime:
    try:
        return dt.datetime.fromtimestamp(float(raw), dt.UTC)
    except (ValueError, OverflowError, OSError):
        parsed = dt.datetime.fromisoformat(raw)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _same(expected: str, given: str) -> bool:
    # Bytes: compare_digest refuses a str with characters outside ASCII (a 500, not a 401).
    return hmac.compare_digest(expected.encode(), given.strip().lower().encode("utf-8", "replace"))


def _check_fresh(sent_at: dt.datetime, header: str) -> None:
    if abs(utcnow() - sent_at) > TIMESTAMP_TOLERANCE:
        raise Unauthorized(
            f"the {header} timestamp is more than 5 minutes away from the server's clock",
            hint="sign and send each request when it is made; check the sender's clock",
        )


def verify_signed(secret: str, body: bytes, header: str) -> str:
    """`Runyard-Signature: t=..,v1=..`: the digest when authentic and fresh; else 401."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    stamp, given = parts.get("t", [""])[0], parts.get("v1", [])
    if not stamp.isdigit() or len(stamp) > 10 or not given:
        raise Unauthorized(f"malformed {SIGNED_HEADER}", hint=SIGNING_HINT)
    expected = signing.digest(secret, stamp, body)
    # Several v1 values are allowed, so that a sender can sign with an old and a new secret.
    if not any(_same(expected, value) for value in given):
        raise Unauthorized("bad signature", hint=SIGNING_HINT)
    _check_fresh(dt.datetime.fromtimestamp(int(stamp), dt.UTC), SIGNED_HEADER)
    return expected


def verify(secret: str, body: bytes, signature: str | None, timestamp: str | None) -> str:
    """The older scheme: the signature's hex digest when authentic and fresh; else 401."""
    if not signature or not signature.startswith("sha256="):
        raise Unauthorized(
            f"missing or malformed {SIGNED_HEADER} (or {SIGNATURE_HEADER})", hint=SIGNING_HINT
        )
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not _same(expected, signature.removeprefix("sha256=")):
        raise Unauthorized("bad signature", hint=SIGNING_HINT)
    try:
        sent_at = _parse_timestamp(timestamp or "")
    except ValueError:
        raise Unauthorized(f"missing or malformed {TIMESTAMP_HEADER}", hint=SIGNING_HINT) from None
    _check_fresh(sent_at, TIMESTAMP_HEADER)
    return expected


def sealing_context(trigger_id: uuid.UUID) -> str:
    """The associated data of a trigger's sealed secret."""
    return f"trigger:{trigger_id}"


_REMEMBER = text(
    """
    INSERT INTO trigger_deliveries (trigger_id, signature, execution_id)
    VALUES (:trigger_id, :signature, :execution_id)
    ON CONFLICT DO NOTHING
    RETURNING trigger_id
    """
)
_FORGET_OLD = text(
    "DELETE FROM trigger_deliveries WHERE trigger_id = :trigger_id AND received_at < :before"
)


def deliver(
    session: Session, trigger_ref: str, body: bytes, headers: dict[str, str | None]
) -> tuple[dict[str, Any], runs.Launched]:
    """Check and run one delivery; the caller commits, then publishes what this returns."""
    try:
        trigger = session.get(Trigger, uuid.UUID(trigger_ref))
    except ValueError:
        trigger = None
    # An event trigger has no URL: it is started by POST /api/v1/events only.
    if trigger is None or trigger.secret is None:
        raise NotFound(f"no trigger {trigger_ref!r}")
    secret = readable(trigger.secret, sealing_context(trigger.id))
    signed = headers.get(SIGNED_HEADER)
    if signed is not None:
        digest = verify_signed(secret, body, signed)
    else:
        digest = verify(secret, body, headers.get(SIGNATURE_HEADER), headers.get(TIMESTAMP_HEADER))
    try:
        # UTF-8 only, strictly: json.loads on bytes would also take UTF-16/32 and raw
        # surrogates, past the escape check below.
        event = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunyardError(
            "the body is not JSON in UTF-8", hint="send a UTF-8 JSON document; it becomes $.event"
        ) from exc
    # The whole event, not only what the input refers to: the same rule as the API's bodies.
    if storable.may_hold_unstorable(body):
        storable.refuse(storable.document_problems(event))
    payload = render(trigger.input, event)
    conn = session.connection()
    run_id = uuid.uuid4()
    launch = launch_for(
        conn,
        trigger.org_id,
        agent_id=trigger.agent_id,
        chain_id=trigger.chain_id,
        version_id=trigger.version_id,
        target_version=trigger.target_version,
        payload=payload,
        run_id=run_id,
    )
    quotas.admit(conn, trigger.org_id, executions=1)
    conn.execute(_FORGET_OLD, {"trigger_id": trigger.id, "before": utcnow() - REPLAY_MEMORY})
    remembered = conn.execute(
        _REMEMBER,
        {"trigger_id": trigger.id, "signature": digest, "execution_id": run_id},
    ).first()
    if remembered is None:
        raise Unauthorized(
            "this request was delivered before (replay)",
            hint="each delivery needs a body of its own, e.g. with an event id",
        )
    launched = runs.launch(conn, [launch])
    run = "chain_execution_id" if trigger.chain_id is not None else "execution_id"
    return {run: run_id, "trigger_id": trigger.id}, launched
