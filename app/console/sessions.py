"""Console sign-in sessions (no Flask): open one from an API token, find it by the cookie's id,
end it. The cookie holds a random id; the table holds its SHA-256, so neither the token nor a
usable session id can be read from the database."""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import text

from app.config import current_config
from app.db import db, utcnow
from app.orgs.services import Principal, authenticate, hash_token


@dataclass(frozen=True)
class UiSession:
    principal: Principal
    csrf_token: str


_INSERT = text(
    """
    INSERT INTO ui_sessions (id, session_hash, org_id, token_id, role, csrf_token, expires_at)
    VALUES (:id, :session_hash, :org_id, :token_id, :role, :csrf_token, :expires_at)
    """
)

# One statement per page: the session, its token (not revoked, not expired) and organization.
_LOOKUP = text(
    """
    SELECT s.csrf_token, t.id AS token_id, t.name AS token_name, t.role, t.expires_at,
           o.id AS org_id, o.name AS org_name
    FROM ui_sessions s
    JOIN api_tokens t ON t.id = s.token_id AND t.revoked_at IS NULL
    JOIN organizations o ON o.id = s.org_id
    WHERE s.session_hash = :session_hash AND s.expires_at > now()
      AND (t.expires_at IS NULL OR t.expires_at > now())
    """
)

# Ended sessions are deleted as new ones start: the table never grows past the live ones.
_PURGE = text("DELETE FROM ui_sessions WHERE expires_at <= now()")


def open_session(token: str) -> tuple[str, UiSession]:
    """Sign in with an API token: (the cookie's value, the session). A bad token raises
    Unauthorized, as it would on the API."""
    principal = authenticate(f"Bearer {token.strip()}")
    session_id = secrets.token_urlsafe(32)
    csrf_token = secrets.token_urlsafe(32)
    expires_at = utcnow() + dt.timedelta(hours=current_config().ui_session_hours)
    if principal.expires_at is not None:
        expires_at = min(expires_at, principal.expires_at)
    with db.hot() as conn:
        conn.execute(_PURGE)
        conn.execute(
            _INSERT,
            {
                "id": uuid.uuid4(),
                "session_hash": hash_token(session_id),
                "org_id": principal.org_id,
                "token_id": principal.token_id,
                "role": principal.role,
                "csrf_token": csrf_token,
                "expires_at": expires_at,
            },
        )
    return session_id, UiSession(principal, csrf_token)


def find(session_id: str | None) -> UiSession | None:
    """The live session the cookie names, or None (unknown, expired, or its token revoked)."""
    if not session_id:
        return None
    with db.hot() as conn:
        row = conn.execute(_LOOKUP, {"session_hash": hash_token(session_id)}).mappings().first()
    if row is None:
        return None
    principal = Principal(
        org_id=row["org_id"],
        org_name=row["org_name"],
        token_id=row["token_id"],
        token_name=row["token_name"],
        role=row["role"],
        expires_at=row["expires_at"],
    )
    return UiSession(principal, row["csrf_token"])


def close(session_id: str | None) -> None:
    if session_id:
        with db.hot() as conn:
            conn.execute(
                text("DELETE FROM ui_sessions WHERE session_hash = :h"),
                {"h": hash_token(session_id)},
            )
