"""Organizations, API tokens and the caller they resolve to."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import threading
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit import services as audit
from app.config import current_config
from app.db import db, utcnow
from app.errors import Conflict, Forbidden, NotFound, Unauthorized, ValidationFailed
from app.orgs.models import ROLES, ApiToken, Organization

TOKEN_PREFIX = "ry_"

# What each role may do. Reading is open to every role of the organization.
PERMISSIONS: dict[str, frozenset[str]] = {
    "read": frozenset(ROLES),
    "agents:write": frozenset({"admin", "developer"}),
    "executions:submit": frozenset({"admin", "developer", "operator"}),
    "executions:cancel": frozenset({"admin", "developer", "operator"}),
    # Subscriptions point the organization's events at a URL: reading one is managing it.
    "notifications": frozenset({"admin", "developer"}),
    "audit:read": frozenset({"admin"}),
    # Setting and deleting secrets; their values are never read back by anyone.
    "secrets:write": frozenset({"admin", "developer"}),
}


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token, its role and its organization."""

    org_id: uuid.UUID
    org_name: str
    token_id: uuid.UUID
    token_name: str
    role: str
    expires_at: dt.datetime | None = None

    def require(self, permission: str) -> None:
        if self.role not in PERMISSIONS[permission]:
            allowed = ", ".join(sorted(PERMISSIONS[permission]))
            raise Forbidden(
                f"the role {self.role!r} may not do this ({permission})",
                hint=f"use a token with one of the roles: {allowed}",
            )


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_org(session: Session, name: str) -> tuple[Organization, str]:
    """Create an organization and its first admin token; the token is returned once, in clear."""
    if not name or len(name) > 63:
        raise ValidationFailed(
            "organization name must be 1 to 63 characters", errors={"name": ["1 to 63 characters"]}
        )
    cfg = current_config()
    org = Organization(
        name=name,
        max_running=cfg.default_max_running,
        max_queued=cfg.default_max_queued,
        submit_rate=cfg.default_submit_rate,
        submit_burst=cfg.default_submit_burst,
        cpu_seconds_per_day=cfg.default_cpu_seconds_per_day,
        weight=cfg.default_weight,
    )
    session.add(org)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"an organization named {name!r} exists already") from exc
    # An admin command (`runyard orgs create`, `runyard up`): audited as the OS user.
    audit.record(session, audit.Actor.cli(org.id), audit.Change("org.create", "org", org.id, name))
    token = create_token(session, org.id, name="admin", role="admin")
    return org, token


def create_token(
    session: Session,
    org_id: uuid.UUID,
    *,
    name: str,
    role: str,
    expires_at: dt.datetime | None = None,
) -> str:
    if role not in ROLES:
        raise ValidationFailed(f"unknown role {role!r}", errors={"role": [f"one of {ROLES}"]})
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiToken(
            org_id=org_id,
            name=name,
            role=role,
            token_hash=hash_token(token),
            prefix=token[:10],
            expires_at=expires_at,
        )
    )
    session.flush()
    return token


def revoke_token(session: Session, token_id: uuid.UUID) -> None:
    found = session.get(ApiToken, token_id)
    if found is None:
        raise NotFound("no such token")
    found.revoked_at = utcnow()
    session.flush()
    token_cache.clear()


def list_tokens(session: Session, org_name: str) -> list[ApiToken]:
    org = get_org_by_name(session, org_name)
    if org is None:
        raise NotFound(f"no organization {org_name!r}")
    return list(
        session.scalars(
            select(ApiToken).where(ApiToken.org_id == org.id).order_by(ApiToken.created_at)
        )
    )


def get_org_by_name(session: Session, name: str) -> Organization | None:
    return session.scalar(select(Organization).where(Organization.name == name))


class TokenCache:
    """Token lookups, trusted for a few seconds.

    Each API request would otherwise cost a query. A revoked token therefore keeps working for at
    most RUNYARD_TOKEN_CACHE_SECONDS in other API processes (in the revoking process, at once).
    """

    def __init__(self, ttl_seconds: float = 5.0, max_entries: int = 10_000) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def get(self, token_hash: str) -> tuple[bool, Principal | None]:
        entry = self._entries.get(token_hash)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]

    def put(self, token_hash: str, principal: Principal | None) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[token_hash] = (time.monotonic() + self.ttl_seconds, principal)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


token_cache = TokenCache()

_LOOKUP = text(
    """
    SELECT t.id, t.name, t.role, t.expires_at, o.id AS org_id, o.name AS org_name
    FROM api_tokens t JOIN organizations o ON o.id = t.org_id
    WHERE t.token_hash = :token_hash AND t.revoked_at IS NULL
    """
)


def authenticate(authorization: str | None) -> Principal:
    """Resolve an `Authorization: Bearer ...` header to a principal, or raise 401."""
    if not authorization:
        raise Unauthorized(
            "missing bearer token", hint="send the header 'Authorization: Bearer <token>'"
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "malformed Authorization header", hint="the form is 'Authorization: Bearer <token>'"
        )
    token_hash = hash_token(token)
    known, principal = token_cache.get(token_hash)
    if not known:
        with db.hot() as conn:
            row = conn.execute(_LOOKUP, {"token_hash": token_hash}).mappings().first()
        principal = (
            Principal(
                org_id=row["org_id"],
                org_name=row["org_name"],
                token_id=row["id"],
                token_name=row["name"],
                role=row["role"],
                expires_at=row["expires_at"],
            )
            if row
            else None
        )
        token_cache.put(token_hash, principal)
    if principal is None:
        raise Unauthorized(
            "invalid or revoked token",
            hint="check the token; an admin of your organization can issue a new one",
        )
    if principal.expires_at is not None and principal.expires_at <= utcnow():
        raise Unauthorized("token expired", hint="ask an admin of your organization for a new one")
    return principal
