"""One exception class per HTTP status, each carrying the server's message, hint and errors."""

from __future__ import annotations

from typing import Any


class RunyardError(Exception):
    """An answer the server refused, or a server that could not be reached."""

    status: int | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        hint: str | None = None,
        errors: dict[str, Any] | None = None,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.hint = hint
        self.errors = errors or {}
        self.body = body
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = f"{self.status} {self.message}" if self.status else self.message
        if self.errors:
            details = "; ".join(f"{key}: {value}" for key, value in self.errors.items())
            text = f"{text} ({details})"
        return text


class ConnectionFailed(RunyardError):
    """The server could not be reached (after the retries a submit gets)."""


class BadRequest(RunyardError):
    status = 400


class Unauthorized(RunyardError):
    status = 401


class Forbidden(RunyardError):
    status = 403


class NotFound(RunyardError):
    status = 404


class Conflict(RunyardError):
    status = 409


class PreconditionFailed(RunyardError):
    status = 412


class PayloadTooLarge(RunyardError):
    status = 413


class ValidationError(RunyardError):
    """422: the body or the input was refused; `.errors` is keyed by field or JSON pointer."""

    status = 422


Unprocessable = ValidationError


class RateLimited(RunyardError):
    """429: a quota or rate limit; `.retry_after` holds the server's Retry-After in seconds."""

    status = 429


class ServerError(RunyardError):
    status = 500


class Unavailable(ServerError):
    status = 503


BY_STATUS: dict[int, type[RunyardError]] = {
    cls.status: cls  # type: ignore[misc]
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PreconditionFailed,
        PayloadTooLarge,
        ValidationError,
        RateLimited,
        ServerError,
        Unavailable,
    )
}


def error_for(status: int, body: Any, retry_after: float | None = None) -> RunyardError:
    """The exception for an error answer of the contract's shape (`message`, `errors`, `hint`)."""
    cls = BY_STATUS.get(status) or (ServerError if status >= 500 else RunyardError)
    if isinstance(body, dict):
        message = str(body.get("message") or body.get("status") or f"HTTP {status}")
        errors = body.get("errors") if isinstance(body.get("errors"), dict) else None
        hint = body.get("hint")
    else:
        message, errors, hint = (str(body)[:500] if body else f"HTTP {status}"), None, None
    return cls(message, status=status, hint=hint, errors=errors, body=body, retry_after=retry_after)


class ExecutionFailed(RunyardError):
    """`run()` saw the execution end in failed, timed_out or cancelled."""

    def __init__(self, execution: dict[str, Any]) -> None:
        error = execution.get("error") or {}
        self.execution = execution
        self.error_type = error.get("type")
        super().__init__(
            f"execution {execution.get('id')} {execution.get('status')}: "
            f"{error.get('type')}: {error.get('message')}",
            hint=error.get("hint"),
        )


class WaitTimeout(RunyardError):
    """`run(wait=True, timeout=...)` gave up waiting; the execution goes on on the server."""

    def __init__(self, execution: dict[str, Any], timeout: float) -> None:
        self.execution = execution
        super().__init__(
            f"execution {execution.get('id')} still {execution.get('status')} after {timeout}s",
            hint="wait longer, or follow it with `runyard logs ID -f`",
        )
