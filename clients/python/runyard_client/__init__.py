"""Runyard's Python client: `Runyard(url, token)` and `AsyncRunyard`, and `@agent` for agents
that declare themselves. It needs httpx only (the CLI's extras: `runyard-client[cli]`)."""

from runyard_client._core import RetryPolicy
from runyard_client.aio import AsyncRunyard
from runyard_client.client import Runyard
from runyard_client.discovery import agent, discover
from runyard_client.errors import (
    BadRequest,
    Conflict,
    ConnectionFailed,
    ExecutionFailed,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    RateLimited,
    RunyardError,
    ServerError,
    Unauthorized,
    Unavailable,
    Unprocessable,
    ValidationError,
    WaitTimeout,
)

__all__ = [
    "AsyncRunyard",
    "BadRequest",
    "Conflict",
    "ConnectionFailed",
    "ExecutionFailed",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "RateLimited",
    "RetryPolicy",
    "Runyard",
    "RunyardError",
    "ServerError",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
    "ValidationError",
    "WaitTimeout",
    "agent",
    "discover",
]
