"""Agent runtimes: each runs a version spec on an input with a ctx and returns an Outcome.

`logs` takes what the agent prints; `ctx.log` writes to the same buffer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from app.executions.spec import VersionSpec
from workers.context import Context, LogLines


@dataclass
class Outcome:
    output: Any = None
    error_type: str | None = None
    error_message: str = ""
    cancelled: bool = False
    usage: dict[str, Any] = field(default_factory=dict)
    # False when trying again cannot help (an http agent's 404, a refused address): the runner
    # then records the error without a retry, whatever the agent's retry policy says.
    retryable: bool = True
    # Shown as the error's `hint` instead of the generic hint of its type, when set.
    hint: str | None = None
    # Set when a durable call made the run wait (workers/durable.py): what it waits for. The
    # run recorded no outcome; the execution waits, and runs again once that happens.
    suspended: Any = None

    @property
    def ok(self) -> bool:
        return self.error_type is None and self.suspended is None


def nondeterministic(message: str) -> Outcome:
    """A replay that asked for other durable calls than the journal holds: final."""
    return Outcome(error_type="nondeterministic", error_message=message, retryable=False)


class Runtime(Protocol):
    def run(
        self, spec: VersionSpec, payload: dict[str, Any], ctx: Context, logs: LogLines
    ) -> Outcome: ...


def runtime_for(kind: str) -> Runtime:
    from workers.runtimes import command, http, python, script

    runtimes: dict[str, Runtime] = {
        "python": python,
        "script": script,
        "command": command,
        "http": http,
    }
    return runtimes[kind]
