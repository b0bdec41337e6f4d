"""Domain exceptions. Services raise these; the HTTP edge maps them to the one error shape."""

from __future__ import annotations

from typing import Any


class RunyardError(Exception):
    status_code = 400

    def __init__(
        self, message: str, *, errors: dict[str, Any] | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors or {}
        self.hint = hint


class Unauthorized(RunyardError):
    status_code = 401


class Forbidden(RunyardError):
    status_code = 403


class NotFound(RunyardError):
    status_code = 404


class Conflict(RunyardError):
    status_code = 409


class UnsupportedMediaType(RunyardError):
    status_code = 415


class ValidationFailed(RunyardError):
    """422: well-formed JSON that breaks a rule; ``errors`` is keyed by JSON pointer."""

    status_code = 422


class QuotaExceeded(RunyardError):
    """429: a limit of the organization refuses the work for now; nothing was stored.
    `headers` go on the answer (Retry-After, and the RateLimit-* ones of the submit rate)."""

    status_code = 429

    def __init__(self, limit: str, message: str, *, retry_after: int, hint: str, **headers: str):
        super().__init__(message, errors={"limit": [limit]}, hint=hint)
        self.limit = limit
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after), **headers}


class Unavailable(RunyardError):
    status_code = 503


def json_pointer(path: Any) -> str:
    """RFC 6901 pointer for a path of keys and indexes."""
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "/" + "/".join(parts) if parts else ""
