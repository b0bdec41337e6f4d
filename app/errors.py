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


class StateConflict(Conflict):
    """A state write whose `expected_version` is not the entry's current version (0: the entry
    does not exist). Raised to agent code by `ctx.state.set`, and answered 412 over HTTP when
    it came from `If-Match`. Here, with no imports, so that the runtimes may import it."""

    def __init__(self, key: str, expected_version: int, current_version: int) -> None:
        now = f"at version {current_version}" if current_version else "not set"
        wanted = f"version {expected_version}" if expected_version else "not set"
        super().__init__(
            f"state {key!r} is {now}, not {wanted} as expected",
            errors={"version": [f"expected {expected_version}, current {current_version}"]},
            hint="read the entry again (ctx.state.entry(key), or GET "
            "/api/v1/agents/{ref}/state/{key} and its ETag) and retry with its version",
        )
        self.key = key
        self.expected_version = expected_version
        self.current_version = current_version


class PreconditionFailed(RunyardError):
    """412: a conditional request (If-Match) whose condition does not hold; nothing changed."""

    status_code = 412


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
