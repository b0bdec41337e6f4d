"""Notifications: subscriptions that POST the organization's events, signed, to a URL; and
their delivery log. The events themselves are written by the state changes (app/outbox.py)
and delivered by the workers (app/notifications/delivery.py, workers/notify.py)."""

from __future__ import annotations

import secrets
import uuid
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.address_guard import AddressRefused, ResolutionFailed, checked_addresses
from app.agents.lookup import find_agent
from app.audit import services as audit
from app.config import current_config
from app.db import page, utcnow
from app.errors import Conflict, NotFound, ValidationFailed
from app.notifications.models import Notification, NotificationEvent
from app.orgs.services import Principal
from app.secrets.crypto import keyring

SECRET_PREFIX = "whsec_"


def _no_lookup(host: str, port: int) -> list[str]:
    return []  # a name is checked on its resolved addresses at each delivery, not here


def check_url(url: str) -> None:
    """422 by pointer for a URL that is not http(s) with a host, or whose host is an address
    the guard refuses (an IP literal, or a name it cannot reach, is known now; other names are
    checked on what they resolve to at each delivery)."""
    problem = None
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        parts, host, port, problem = None, None, None, f"not a URL: {exc}"
    if problem is None and (parts is None or parts.scheme not in ("http", "https")):
        problem = "the scheme must be http or https"
    elif problem is None and not host:
        problem = "the URL has no host"
    elif problem is None:
        default = 443 if parts.scheme == "https" else 80
        try:
            checked_addresses(
                host,
                port or default,
                allow_hosts=current_config().http_allow_hosts,
                resolver=_no_lookup,
            )
        except AddressRefused as refused:
            raise ValidationFailed(
                refused.message, errors={"/url": [refused.message]}, hint=refused.hint
            ) from None
        except ResolutionFailed:
            pass
    if problem:
        raise ValidationFailed(f"bad url: {problem}", errors={"/url": [problem]})


def _agents(session: Session, principal: Principal, names: list[str]) -> list[uuid.UUID]:
    conn = session.connection()
    found, errors = [], {}
    for index, name in enumerate(names):
        agent = find_agent(conn, principal.org_id, name, by_id=True)
        if agent is None:
            errors[f"/filter/agents/{index}"] = [f"no agent {name!r} in your organization"]
        else:
            found.append(agent["id"])
    if errors:
        raise ValidationFailed(
            "the filter names unknown agents", errors=errors, hint="GET /api/v1/agents lists them"
        )
    return found


def _apply_filter(
    session: Session, principal: Principal, notification: Notification, given: dict
) -> None:
    names = given.get("agents")
    notification.agent_names = names or None
    notification.agent_ids = _agents(session, principal, names) if names else None


def _flush_or_conflict(session: Session, name: str) -> None:
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(
            f"a notification named {name!r} exists already", hint="choose another name"
        ) from exc


def sealing_context(notification_id: uuid.UUID) -> str:
    """The associated data of a subscription's sealed signing secret."""
    return f"notification:{notification_id}"


def create(
    session: Session, principal: Principal, data: dict[str, Any]
) -> tuple[Notification, str]:
    """The subscription and its secret, returned once."""
    principal.require("notifications")
    check_url(data["url"])
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    notification_id = uuid.uuid4()
    notification = Notification(
        id=notification_id,
        org_id=principal.org_id,
        name=data["name"],
        url=data["url"],
        events=sorted(set(data["events"])),
        secret=keyring().seal(secret, sealing_context(notification_id)),
    )
    _apply_filter(session, principal, notification, data["filter"])
    session.add(notification)
    _flush_or_conflict(session, data["name"])
    _audit(session, principal, "notification.create", notification)
    return notification, secret


def _audit(
    session: Session,
    principal: Principal,
    action: str,
    notification: Notification,
    changes: list[dict[str, Any]] | None = None,
) -> None:
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change(action, "notification", notification.id, notification.name, changes),
    )


def _audited_state(notification: Notification) -> dict[str, Any]:
    """Never the secret."""
    shown = present(notification)
    return {key: shown[key] for key in ("name", "url", "events", "filter")}


def get(session: Session, principal: Principal, notification_id: str) -> Notification:
    principal.require("notifications")
    try:
        wanted = uuid.UUID(notification_id)
    except ValueError:
        wanted = None
    found = (
        session.scalar(
            select(Notification).where(
                Notification.id == wanted, Notification.org_id == principal.org_id
            )
        )
        if wanted
        else None
    )
    if found is None:
        raise NotFound(
            f"no notification {notification_id!r}", hint="GET /api/v1/notifications lists them"
        )
    return found


def list_notifications(
    session: Session, principal: Principal, *, offset: int, limit: int
) -> tuple[list[Notification], int]:
    principal.require("notifications")
    query = select(Notification).where(Notification.org_id == principal.org_id)
    return page(
        session, query, Notification.created_at.desc(), Notification.id, offset=offset, limit=limit
    )


def change(
    session: Session, principal: Principal, notification_id: str, data: dict[str, Any]
) -> Notification:
    notification = get(session, principal, notification_id)
    before = _audited_state(notification)
    if "url" in data:
        check_url(data["url"])
        notification.url = data["url"]
    if "name" in data:
        notification.name = data["name"]
    if "events" in data:
        notification.events = sorted(set(data["events"]))
    if "filter" in data:
        _apply_filter(session, principal, notification, data["filter"])
    notification.updated_at = utcnow()
    _flush_or_conflict(session, notification.name)
    changes = audit.changes_between(before, _audited_state(notification))
    _audit(session, principal, "notification.update", notification, changes)
    return notification


def delete(session: Session, principal: Principal, notification_id: str) -> None:
    """Its pending deliveries go with it (they are rows of the subscription)."""
    notification = get(session, principal, notification_id)
    session.delete(notification)
    session.flush()
    _audit(session, principal, "notification.delete", notification)


def present(notification: Notification, secret: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": notification.id,
        "name": notification.name,
        "url": notification.url,
        "events": notification.events,
        "filter": {"agents": notification.agent_names} if notification.agent_names else {},
        "created_at": notification.created_at,
        "updated_at": notification.updated_at,
    }
    if secret is not None:
        body["secret"] = secret
    return body


# ---------------------------------------------------------------------------------------------
# The delivery log


def deliveries(
    session: Session, principal: Principal, notification_id: str, *, offset: int, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """The subscription's events and how their delivery went, newest first."""
    notification = get(session, principal, notification_id)
    query = select(NotificationEvent).where(NotificationEvent.notification_id == notification.id)
    rows, total = page(
        session,
        query,
        NotificationEvent.created_at.desc(),
        NotificationEvent.id,
        offset=offset,
        limit=limit,
    )
    return [present_delivery(row) for row in rows], total


def present_delivery(event: NotificationEvent) -> dict[str, Any]:
    return {
        "event_id": event.id,
        "type": event.type,
        "status": event.status,
        "attempts": event.attempts,
        "last_status_code": event.last_status_code,
        "last_error": event.last_error,
        "next_attempt_at": event.next_attempt_at if event.status == "pending" else None,
        "delivered_at": event.delivered_at,
        "created_at": event.created_at,
    }


def redeliver(
    session: Session, principal: Principal, notification_id: str, event_id: str
) -> uuid.UUID:
    """Put one event back to pending, due now, whatever became of it; its retry window starts
    again from now. The event id, to publish once committed."""
    notification = get(session, principal, notification_id)
    try:
        wanted = uuid.UUID(event_id)
    except ValueError:
        wanted = None
    found = (
        session.execute(
            update(NotificationEvent)
            .where(
                NotificationEvent.id == wanted,
                NotificationEvent.notification_id == notification.id,
            )
            .values(
                status="pending",
                next_attempt_at=utcnow(),
                retry_from=utcnow(),
            )
            .returning(NotificationEvent.id)
        ).scalar()
        if wanted
        else None
    )
    if found is None:
        raise NotFound(
            f"no event {event_id!r} for this notification",
            hint="GET /api/v1/notifications/{id}/deliveries lists them",
        )
    _audit(
        session,
        principal,
        "notification.redeliver",
        notification,
        [{"op": "replace", "path": f"/deliveries/{found}/status", "value": "pending"}],
    )
    return found
