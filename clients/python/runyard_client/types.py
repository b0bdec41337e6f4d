"""The shapes the API answers with (the contract's fields), as TypedDicts: results are plain
dicts, so they print as JSON as they are."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

Status = Literal["queued", "running", "waiting", "succeeded", "failed", "timed_out", "cancelled"]
TERMINAL = frozenset({"succeeded", "failed", "timed_out", "cancelled"})


class ErrorInfo(TypedDict, total=False):
    type: str
    message: str
    hint: str | None


class Progress(TypedDict, total=False):
    fraction: float
    message: str | None
    at: str


class Agent(TypedDict, total=False):
    id: str
    name: str
    description: str | None
    runtime: dict[str, Any]
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    timeout_seconds: int
    retry: dict[str, Any]
    limits: dict[str, Any]
    queue: str
    capabilities: list[Any]
    tags: list[str]
    config: dict[str, Any]
    concurrency: dict[str, Any] | None
    rate_limit: dict[str, Any] | None
    current_version: str
    created_at: str
    updated_at: str
    archived_at: str | None


class Execution(TypedDict, total=False):
    id: str
    agent_id: str
    agent_name: str
    agent_version: str
    status: Status
    input: dict[str, Any]
    output: dict[str, Any] | None
    error: ErrorInfo | None
    attempts: int
    progress: Progress | None
    waiting_for: str | None
    rerun_of: str | None
    chain_execution_id: str | None
    queued_at: str
    started_at: str | None
    finished_at: str | None
    duration_ms: int | None
    resource_usage: dict[str, Any] | None


class LogLine(TypedDict, total=False):
    seq: int
    ts: str
    level: str
    message: str
    fields: dict[str, Any]


class Event(TypedDict):
    """One Server-Sent Event of an execution's stream: `log`, `status` or `end`."""

    event: str
    data: Any
    id: str | None


class Chain(TypedDict, total=False):
    id: str
    name: str
    current_version: str
    steps: list[dict[str, Any]]
    created_at: str


class ChainExecution(TypedDict, total=False):
    id: str
    chain_id: str
    chain_version: str
    status: str
    input: dict[str, Any]
    output: dict[str, Any] | None
    error: ErrorInfo | None
    steps: list[dict[str, Any]]


class Schedule(TypedDict, total=False):
    id: str
    name: str
    target: dict[str, Any]
    cron: str
    timezone: str
    enabled: bool
    next_fire_at: str | None


class ScheduleFire(TypedDict, total=False):
    fire_time: str
    fired_at: str | None
    status: str
    execution_id: str | None
    chain_execution_id: str | None
    skipped_reason: str | None
