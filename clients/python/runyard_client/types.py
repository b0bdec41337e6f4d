"""The shapes the API answers with (the contract's fields), as TypedDicts: results are plain
dicts, so they print as JSON as they are."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

Status = Literal["queued", "running", "waiting", "succeeded", "failed", "timed_out", "cancelled"]
TERMINAL = frozenset({"succeeded", "failed", "timed_out", "cancelled"})


class ErrorInfo(TypedDict, total=False):
    type: str
    message: str
    hint: str


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
    wallet_policy: dict[str, Any] | None
    current_version: str
    visibility: Literal["private", "public"]
    catalog_runs: int
    created_at: str
    updated_at: str
    archived_at: str | None


class CreatedBy(TypedDict):
    """The token that made a row (null for what Runyard made itself)."""

    token_id: str
    token_name: str


class AttachedDocument(TypedDict, total=False):
    """A document as an execution lists it (and as ctx.documents shows it)."""

    id: str
    name: str
    content_type: str
    size: int


class Document(TypedDict, total=False):
    id: str
    name: str
    content_type: str
    size: int
    sha256: str
    created_at: str


class AssignmentCandidate(TypedDict):
    agent: str
    load: int


class Assignment(TypedDict):
    """How POST /executions chose the agent by capability and load."""

    capability: str
    candidates: list[AssignmentCandidate]


class Execution(TypedDict, total=False):
    id: str
    agent_id: str
    agent_name: str
    agent_version: str
    status: Status
    priority: int
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
    traceparent: str | None
    created_by: CreatedBy | None
    parent_execution_id: str | None
    children: list[str]
    assigned_by: Assignment | None
    # Where an execution is shown as GET /executions/{id} shows it; absent from lists.
    documents: list[AttachedDocument]


class JournalEntry(TypedDict, total=False):
    """One durable call of an execution (GET /executions/{id}/journal)."""

    seq: int
    kind: Literal["step", "child", "sleep", "event"]
    name: str
    status: str
    result: Any | None
    at: str
    child_execution_id: str | None
    due_at: str | None


class LogLine(TypedDict, total=False):
    seq: int
    ts: str
    level: str
    message: str
    fields: dict[str, Any]
    attempt: int


class Event(TypedDict):
    """One Server-Sent Event of an execution's stream: `log`, `status` or `end`."""

    event: str
    data: Any
    id: str | None


class Chain(TypedDict, total=False):
    id: str
    name: str
    description: str | None
    input_schema: dict[str, Any]
    steps: list[dict[str, Any]]
    on_failure: str
    current_version: str
    created_at: str
    updated_at: str
    archived_at: str | None


class ChainExecution(TypedDict, total=False):
    id: str
    chain_id: str
    chain_name: str
    chain_version: str
    status: str
    priority: int
    input: dict[str, Any]
    output: dict[str, Any] | None
    error: ErrorInfo | None
    rerun_of: str | None
    steps: list[dict[str, Any]]
    compensations: list[dict[str, Any]]
    queued_at: str
    started_at: str | None
    finished_at: str | None
    duration_ms: int | None
    created_by: CreatedBy | None


class Schedule(TypedDict, total=False):
    id: str
    name: str
    target: dict[str, Any]
    cron: str
    timezone: str
    input: dict[str, Any]
    enabled: bool
    overlap: str
    catchup: str
    catchup_window_seconds: int
    pause_after_failures: int
    consecutive_failures: int
    next_fire_at: str | None
    last_fire_at: str | None
    last_execution_id: str | None
    paused_reason: str | None
    created_at: str
    updated_at: str
    created_by: CreatedBy | None


class ScheduleFire(TypedDict, total=False):
    fire_time: str
    fired_at: str
    kind: str
    status: str
    execution_status: str | None
    execution_id: str | None
    chain_execution_id: str | None
    skipped_reason: str | None


class StateKey(TypedDict, total=False):
    key: str
    version: int
    updated_at: str


class StateEntry(TypedDict, total=False):
    key: str
    value: Any | None
    version: int
    updated_at: str


class Trigger(TypedDict, total=False):
    """A webhook trigger (`url`, and `secret` in the create answer only) or an event trigger
    (`on_event`: `{"name", "filter"}`, no URL, no secret)."""

    id: str
    name: str
    target: dict[str, Any]
    input: dict[str, Any]
    url: str | None
    secret: str
    on_event: dict[str, Any] | None
    created_at: str
    created_by: CreatedBy | None


class EventStarted(TypedDict, total=False):
    """What one event trigger did with an event: the run it started, or the `error`
    (`{"type", "message", "hint"}`) that kept it from starting one."""

    trigger_id: str
    execution_id: str
    chain_execution_id: str
    error: dict[str, Any]


class EventAccepted(TypedDict, total=False):
    """POST /events' answer. `duplicate`: the same id was accepted within 24 hours; this one
    delivered nothing (`id` is the first event's)."""

    id: str
    event_id: str
    name: str
    received_at: str
    resumed: list[str]
    started: list[EventStarted]
    duplicate: bool


class SentEvent(TypedDict, total=False):
    """An event as GET /events lists it (not a stream's Event)."""

    id: str
    event_id: str
    name: str
    data: dict[str, Any]
    received_at: str
    resumed: list[str]
    started: list[EventStarted]
    created_by: CreatedBy | None


class Wallet(TypedDict, total=False):
    """An agent's wallet, made by the wallet service."""

    address: str
    label: str | None
    provider: str
    created_at: str


DecisionStatus = Literal[
    "refused", "awaiting_approval", "rejected", "queued", "sent", "mined", "errored"
]


class Decision(TypedDict, total=False):
    """A transfer an agent asked for: how its policy judged it, and what became of it."""

    id: str
    agent: str
    execution_id: str | None
    kind: str
    chain: str
    to: str
    amount: str
    currency: str
    reason: str | None
    policy_check: dict[str, Any]
    status: DecisionStatus
    queue_id: str | None
    transaction_hash: str | None
    error: str | None
    approved_by: CreatedBy | None
    created_at: str
    updated_at: str
