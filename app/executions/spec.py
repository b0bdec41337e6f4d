"""What an execution is, as every layer sees it: its statuses, log levels, error types and their
hints, the agent version spec a runtime runs, and the claim a worker holds.

No database and no broker here: the runtimes import this module, and importing a runtime must
not pull in SQLAlchemy or psycopg.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from jsonschema.protocols import Validator

from app import jsonschemas

# `waiting`: a durable agent waits for a child, a sleep or an event, holding no worker and no
# slot (app/executions/waiting.py); what it waits for queues it again.
STATUSES = ("queued", "running", "waiting", "succeeded", "failed", "timed_out", "cancelled")
TERMINAL_STATUSES = ("succeeded", "failed", "timed_out", "cancelled")
# What a durable call records in the journal (app/durable).
JOURNAL_KINDS = ("step", "child", "sleep", "event")
# Why a queued execution is held back with no message in the broker. "queue": its organization
# has its share of the queue's window in the broker already (fairness); the API shows it as
# null, since nothing but its turn holds it. The others are the limits of API.md.
WAITING_FOR = ("queue", "org_max_running", "agent_concurrency", "agent_rate_limit")
LIMIT_WAITS = ("org_max_running", "agent_concurrency", "agent_rate_limit")

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
LEVEL_NAMES = {number: name for name, number in LEVELS.items()}

DEFAULT_PRIORITY = 5
# Beyond the soft limit the runtime gets this long to record `timeout` before Celery kills it.
HARD_LIMIT_GRACE_SECONDS = 10
CHILD_RUNTIME_BACKSTOP_SECONDS = 5

HINTS = {
    "input_invalid": "the input does not match the agent's input_schema",
    "output_invalid": "the agent returned an output that does not match its output_schema; "
    "fix the agent or PATCH the schema (a new version)",
    "runtime_error": "the agent failed; its logs hold the traceback or the program's stderr",
    "timeout": "the execution ran past timeout_seconds; raise it or speed the agent up",
    "cancelled": "cancelled through POST /api/v1/executions/{id}/cancel",
    "lost": "the worker running the attempt stopped answering (killed, or its host lost); "
    "`lost` in retry.retry_on lets such an attempt run again",
    "memory_limit": "the agent's processes used more memory than limits.memory_mb; raise the "
    "limit (a new version) or make the agent use less",
    "cpu_limit": "the agent's processes used more CPU time than limits.cpu_seconds; raise the "
    "limit (a new version) or make the agent do less",
    "output_too_large": "the output is over limits.max_output_bytes (or RUNYARD_MAX_OUTPUT_BYTES "
    "when unset); return less, or store large results elsewhere and return a reference",
    "file_size_limit": "the agent wrote a file over RUNYARD_CHILD_MAX_FILE_MB",
    "process_limit": "the agent ran more processes at once than RUNYARD_CHILD_MAX_PROCESSES",
    "secret_missing": "a secret the agent refers to was deleted, no key in the worker's "
    "RUNYARD_SECRET_KEYS opens it, or its value cannot stand where it is used (a line break in "
    "a header); PUT /api/v1/secrets/<name> again, or fix the worker's keys",
    "nondeterministic": "a durable agent ran again and asked for other durable calls (ctx.step, "
    "ctx.run, ctx.sleep, ctx.wait_for_event) than its journal holds; code between durable calls "
    "must make the same calls in the same order on every run (README, Durable agents)",
    "superseded": "a newer execution of the same concurrency key replaced it (the agent's "
    "concurrency.on_limit is cancel_running)",
}


def error_body(error_type: str, message: str, hint: str | None = None) -> dict[str, str]:
    return {"type": error_type, "message": message, "hint": hint or HINTS.get(error_type, "")}


@dataclass(frozen=True)
class VersionSpec:
    """An agent version as the hot path needs it: immutable, so each process caches it for good
    (app/executions/versions.py)."""

    id: uuid.UUID
    agent_id: uuid.UUID
    agent_name: str
    version: str
    runtime: dict[str, Any]
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    timeout_seconds: int
    retry: dict[str, Any]
    limits: dict[str, Any]
    queue: str
    config: dict[str, Any]
    # Flow control, or None: {"limit", "key"?, "on_limit"} and {"limit", "period_seconds",
    # "key"?} (keys are "$.input..." references).
    concurrency: dict[str, Any] | None = None
    rate_limit: dict[str, Any] | None = None
    org_id: uuid.UUID | None = None
    # Loaded with the version (app/executions/versions.py): organizations are never renamed.
    org_name: str | None = None

    @property
    def org_label(self) -> str:
        """How Flower and the logs name its organization (app/broker)."""
        return self.org_name or str(self.org_id)

    @property
    def max_attempts(self) -> int:
        return 1 + int(self.retry.get("max_retries", 0))

    @property
    def soft_time_limit(self) -> float:
        """Celery's soft limit. Runtimes with a child process enforce timeout_seconds themselves
        and kill it; Celery's limit is then only a backstop, set a little later."""
        if self.runtime["type"] == "python":
            return self.timeout_seconds
        return self.timeout_seconds + CHILD_RUNTIME_BACKSTOP_SECONDS

    @property
    def time_limit(self) -> float:
        """Celery's hard limit: the soft one and a grace to record `timeout` in."""
        return self.soft_time_limit + HARD_LIMIT_GRACE_SECONDS

    # Built once per cached spec, not once per execution.
    @cached_property
    def input_validator(self) -> Validator:
        return jsonschemas.validator_for(self.input_schema)

    @cached_property
    def output_validator(self) -> Validator:
        return jsonschemas.validator_for(self.output_schema)

    @property
    def limited(self) -> bool:
        """Whether the agent's own flow control applies to its executions."""
        return self.concurrency is not None or self.rate_limit is not None

    def flow_key(self, payload: Any) -> str | None:
        """The concurrency group of an input, as stored in executions.flow_key."""
        return None if self.concurrency is None else key_value(self.concurrency, payload)

    def rate_key(self, payload: Any) -> str | None:
        """The rate-limit group of an input, as stored in executions.rate_key."""
        return None if self.rate_limit is None else key_value(self.rate_limit, payload)

    def input_errors(self, payload: Any, pointer: str = "/input") -> dict[str, Any]:
        """What the input schema refuses in `payload`, keyed by JSON pointer under `pointer`."""
        # is_valid stops at the first problem and builds no error objects: the cheap answer for
        # the usual valid input.
        if self.input_validator.is_valid(payload):
            return {}
        return jsonschemas.instance_errors(self.input_validator, payload, pointer)


def key_value(limit: dict[str, Any], payload: Any) -> str:
    """The value `limit["key"]` ("$.input.a.b") picks out of an input, as JSON text: one group
    per value. No key: one group, "null"; an input without the value: the group "null"."""
    value: Any = payload
    for name in limit.get("key", "$.input").split(".")[2:]:
        value = value.get(name) if isinstance(value, dict) else None
    if limit.get("key") is None:
        value = None
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Claim:
    """A queued execution a worker took (app/executions/store.py: claim)."""

    execution_id: uuid.UUID
    attempt: int
    version_id: uuid.UUID
    input: dict[str, Any]
    priority: int
    last_seq: int
    # Set for a chain step: the runner then tells the chain when the step settles.
    chain_execution_id: uuid.UUID | None = None
    org_id: uuid.UUID | None = None
    # A limit applied when it was submitted: its end frees a slot (app/executions/gates.py).
    gated: bool = False
    # The W3C traceparent it was submitted with, handed to the runtime.
    traceparent: str | None = None
    # Set for a child of a durable agent: its end may wake the parent (app/durable/waits.py).
    parent_execution_id: uuid.UUID | None = None
    # How many times it was woken before this claim: a resume keeps the attempt, so this tells
    # this run from the next one of the same attempt.
    resumes: int = 0
