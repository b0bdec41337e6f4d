"""The console's edge checks: the session cookie, CSRF on every state-changing form, roles."""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from flask import Response, g, redirect, request, url_for

from app import storable
from app.console import sessions
from app.errors import Forbidden
from app.orgs.services import PERMISSIONS, Principal

COOKIE = "runyard_ui"
# Signing in has no session yet: its form is guarded by a double-submit cookie instead.
LOGIN_CSRF_COOKIE = "runyard_ui_login"
PUBLIC_ENDPOINTS = frozenset({"console.login", "console.static"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def principal() -> Principal:
    return g.ui_session.principal


def may(permission: str) -> bool:
    """For templates: show a button only to roles that may press it."""
    session = g.get("ui_session")
    return session is not None and session.principal.role in PERMISSIONS[permission]


def csrf_token() -> str:
    session = g.get("ui_session")
    if session is not None:
        return session.csrf_token
    if "login_csrf" not in g:
        g.login_csrf = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
    return g.login_csrf


def _same(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(expected, given)


def check_request() -> Response | None:
    """Before every /ui/ request: find the session (or send to the sign-in page), then refuse a
    state-changing request without the right CSRF token (403)."""
    if request.endpoint == "console.static":
        return None  # the stylesheet, scripts and licence: no session to look up
    _refuse_unstorable()
    g.ui_session = sessions.find(request.cookies.get(COOKIE))
    if request.endpoint in PUBLIC_ENDPOINTS:
        if request.method in STATE_CHANGING and not _same(
            request.cookies.get(LOGIN_CSRF_COOKIE), request.form.get("csrf_token")
        ):
            raise Forbidden("the form's CSRF token is missing or wrong", hint="reload the page")
        return None
    if g.ui_session is None:
        target = request.full_path if request.method == "GET" else None
        return redirect(url_for("console.login", next=target) if target else "/ui/login")
    if request.method in STATE_CHANGING and not _same(
        g.ui_session.csrf_token, request.form.get("csrf_token")
    ):
        raise Forbidden("the form's CSRF token is missing or wrong", hint="reload the page")
    return None


def _refuse_unstorable() -> None:
    """Text PostgreSQL cannot store (U+0000, ...) in a path, query or form field: a 422 page,
    as the API answers, never a 500 from the database."""
    values = [*(request.view_args or {}).items(), *request.args.items(multi=True)]
    if request.method in STATE_CHANGING:
        values.extend(request.form.items(multi=True))
    storable.refuse(
        {
            name: [found]
            for name, value in values
            if isinstance(value, str) and (found := storable.problem(value))
        }
    )


def set_cookie(response: Response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/ui/",
        httponly=True,
        samesite="Lax",
        secure=request.is_secure,
    )


def safe_next(target: str | None) -> str:
    """Only a path under /ui/ of this site: never an open redirect."""
    if target and target.startswith("/ui/") and not urlsplit(target).netloc:
        return target
    return "/ui/"
