"""Organizations, API tokens and the caller they resolve to."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
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
from app.db import db, page, utcnow
from app.errors import Conflict, Forbidden, NotFound, Unauthorized, ValidationFailed
from app.orgs.models import ROLES, ApiToken, Organization

log = logging.getLogger(__name__)

TOKEN_PREFIX = "ry_"
# A running execution's own token (RUNYARD_EXECUTION_TOKEN): role "execution", good only while
# the attempt it was issued to runs.
EXECUTION_TOKEN_PREFIX = "rye_"
EXECUTION_ROLE = "execution"

# What each role may do. Reading is open to every role of the organization, and to a running
# execution's own token, which may also start executions (its children), send events, and
# use the agent's state and documents.
PERMISSIONS: dict[str, frozenset[str]] = {
    "read": frozenset(ROLES) | {EXECUTION_ROLE},
    "agents:write": frozenset({"admin", "developer"}),
    "executions:submit": frozenset({"admin", "developer", "operator", EXECUTION_ROLE}),
    "executions:cancel": frozenset({"admin", "developer", "operator"}),
    # Subscriptions point the organization's events at a URL: reading one is managing it.
    "notifications": frozenset({"admin", "developer"}),
    "audit:read": frozenset({"admin"}),
    # Setting and deleting secrets; their values are never read back by anyone.
    "secrets:write": frozenset({"admin", "developer"}),
    "tokens": frozenset({"admin"}),
    # Listing an agent in the catalog opens it to every organization.
    "agents:publish": frozenset({"admin"}),
    # An agent's wallet moves money; an answer to a decision awaiting approval lets it.
    "wallets:write": frozenset({"admin"}),
    "decisions:answer": frozenset({"admin"}),
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
    # Set for an execution's own token: what it starts are that execution's children.
    execution_id: uuid.UUID | None = None
    execution_attempt: int | None = None

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
    audited_as: audit.Actor | None = None,
) -> str:
    """A new token of the organization, returned once, in clear (only its hash is stored).
    `audited_as`: the actor of the token.create event (the admin command line's OS user)."""
    row, token = _new_token(session, org_id, name=name, role=role, expires_at=expires_at)
    if audited_as is not None:
        _audit_created(session, audited_as, row)
    return token


def _audit_created(session: Session, actor: audit.Actor, row: ApiToken) -> None:
    # The role and expiry, never the token.
    granted = {"role": row.role, "expires_at": row.expires_at}
    audit.record(
        session,
        actor,
        audit.Change(
            "token.create",
            "token",
            row.id,
            row.name,
            [{"op": "add", "path": f"/{key}", "value": value} for key, value in granted.items()],
        ),
    )


def _new_token(
    session: Session,
    org_id: uuid.UUID,
    *,
    name: str,
    role: str,
    expires_at: dt.datetime | None = None,
) -> tuple[ApiToken, str]:
    if role not in ROLES:
        raise ValidationFailed(f"unknown role {role!r}", errors={"role": [f"one of {ROLES}"]})
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        org_id=org_id,
        name=name,
        role=role,
        token_hash=hash_token(token),
        prefix=token[:10],
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row, token


def revoke_token(session: Session, token_id: uuid.UUID) -> None:
    """Revoke any organization's token (the admin command line)."""
    found = session.get(ApiToken, token_id)
    if found is None:
        raise NotFound("no such token")
    _revoke(session, found, audit.Actor.cli(found.org_id))


def _revoke(session: Session, token: ApiToken, actor: audit.Actor) -> None:
    # Revoking twice keeps the first time: the answer is the same, and so is the record.
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        session.flush()
    audit.record(session, actor, audit.Change("token.revoke", "token", token.id, token.name))
    # This process forgets it at once; the others within RUNYARD_TOKEN_CACHE_SECONDS.
    token_cache.clear()


# Tokens over the API (admins only): issue, list, revoke, within the caller's organization.


def issue(
    session: Session, principal: Principal, *, name: str, role: str, expires_in_days: int | None
) -> tuple[ApiToken, str]:
    """A new token of the caller's organization and its secret (shown once)."""
    principal.require("tokens")
    expires_at = None
    if expires_in_days is not None:
        expires_at = utcnow() + dt.timedelta(days=expires_in_days)
    row, token = _new_token(session, principal.org_id, name=name, role=role, expires_at=expires_at)
    _audit_created(session, audit.Actor.of(principal), row)
    return row, token


def list_org_tokens(
    session: Session, principal: Principal, *, offset: int, limit: int
) -> tuple[list[ApiToken], int]:
    principal.require("tokens")
    query = select(ApiToken).where(ApiToken.org_id == principal.org_id)
    return page(
        session, query, ApiToken.created_at.desc(), ApiToken.id.desc(), offset=offset, limit=limit
    )


def revoke(session: Session, principal: Principal, token_id: uuid.UUID) -> None:
    """Revoke a token of the caller's organization; revoking one twice is no error. An admin
    may revoke the very token it calls with: the next request with it answers 401."""
    principal.require("tokens")
    found = session.scalar(
        select(ApiToken).where(ApiToken.id == token_id, ApiToken.org_id == principal.org_id)
    )
    if found is None:
        raise NotFound(
            f"no token {token_id}", hint="GET /api/v1/tokens lists your organization's tokens"
        )
    _revoke(session, found, audit.Actor.of(principal))


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
    """Token lookups, trusted for RUNYARD_TOKEN_CACHE_SECONDS (default 5).

    Each API request would otherwise cost a query. A revoked token therefore keeps working for at
    most that long in other API processes (in the revoking process, not at all: it clears its
    cache). An expired token is refused at once everywhere: its expiry is checked on every
    request, cached or not.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def get(self, token_hash: str) -> tuple[bool, Principal | None]:
        entry = self._entries.get(token_hash)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]

    def put(self, token_hash: str, principal: Principal | None, ttl_seconds: float) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[token_hash] = (time.monotonic() + ttl_seconds, principal)

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


class LastUse:
    """`last_used_at`, kept cheaply: each API process stamps a token at most once per
    STAMP_SECONDS, and the UPDATE writes only when the stored time is older than that, so
    however many processes there are, a token's row is written about once a minute while it
    is in use, never once per request."""

    STAMP_SECONDS = 60

    def __init__(self) -> None:
        self._stamped: dict[uuid.UUID, float] = {}

    def due(self, token_id: uuid.UUID) -> bool:
        """Whether this process should stamp the token now (and, if so, it counts as done)."""
        now = time.monotonic()
        last = self._stamped.get(token_id)
        if last is not None and now - last < self.STAMP_SECONDS:
            return False
        if len(self._stamped) >= 10_000:
            self._stamped.clear()
        self._stamped[token_id] = now
        return True

    def forget(self) -> None:
        self._stamped.clear()


last_use = LastUse()

_STAMP = text(
    f"""
    UPDATE api_tokens SET last_used_at = now()
    WHERE id = :id AND (last_used_at IS NULL
                        OR last_used_at < now() - interval '{LastUse.STAMP_SECONDS} seconds')
    """
)


def _stamp_last_use(token_id: uuid.UUID) -> None:
    """One statement, once a minute per token and process, on a connection of its own (its row
    lock never outlives the statement, whatever transaction the caller is in). A failure costs
    the stamp, never the request."""
    try:
        with db.detached() as conn:
            conn.execute(_STAMP, {"id": token_id})
    except Exception:
        log.warning("could not record the use of token %s", token_id, exc_info=True)


# Not cached: the token stops working the moment its attempt ends.
_EXECUTION_LOOKUP = text(
    """
    SELECT e.id, e.attempt, e.agent_name, o.id AS org_id, o.name AS org_name
    FROM execution_tokens t
    JOIN executions e ON e.id = t.execution_id AND e.attempt = t.attempt
                     AND e.status = 'running'
    JOIN organizations o ON o.id = e.org_id
    WHERE t.token_hash = :token_hash
    """
)


def _execution_principal(token_hash: str) -> Principal:
    with db.hot() as conn:
        row = conn.execute(_EXECUTION_LOOKUP, {"token_hash": token_hash}).mappings().first()
    if row is None:
        raise Unauthorized(
            "invalid or expired execution token",
            hint="an execution token works only while the execution it was issued to runs",
        )
    return Principal(
        org_id=row["org_id"],
        org_name=row["org_name"],
        token_id=row["id"],
        token_name=f"execution {row['id']} ({row['agent_name']})",
        role=EXECUTION_ROLE,
        execution_id=row["id"],
        execution_attempt=row["attempt"],
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
    if token.startswith(EXECUTION_TOKEN_PREFIX):
        return _execution_principal(token_hash)
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
        token_cache.put(token_hash, principal, current_config().token_cache_seconds)
    if principal is None:
        raise Unauthorized(
            "invalid or revoked token",
            hint="check the token; an admin of your organization can issue a new one",
        )
    if principal.expires_at is not None and principal.expires_at <= utcnow():
        raise Unauthorized("token expired", hint="ask an admin of your organization for a new one")
    if last_use.due(principal.token_id):
        _stamp_last_use(principal.token_id)
    return principal
