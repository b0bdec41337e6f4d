"""What an agent receives as `ctx`, and the interface its log lines go through.

No database here: the runtimes import this module. The buffer that writes the lines is
workers/logbuffer.py's, handed to the runtime by the runner.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from app import storable
from app.errors import StateConflict
from app.executions.spec import LEVELS
from workers.context_documents import Document, DocumentSource, HandedDocuments, HandedFiles
from workers.context_wallet import TransferRefused, Wallet, WalletGateway, WalletUnavailable

# Agents import the exceptions of durable calls from here: ChildFailed, StateConflict,
# TransferRefused.
__all__ = [
    "ChildFailed",
    "Context",
    "Nondeterministic",
    "StateConflict",
    "Suspended",
    "TransferRefused",
    "WalletUnavailable",
]

# How long a transfer above approval_over waits for an admin before it is refused.
APPROVAL_TIMEOUT_SECONDS = 7 * 24 * 3600


class LogLines(Protocol):
    """Where a runtime sends what the agent prints and logs (workers.logbuffer.LogBuffer)."""

    def add(self, level: int, message: str, fields: dict[str, Any] | None = None) -> None: ...

    def flush_if_due(self) -> None: ...


class ProgressSink(Protocol):
    """Where ctx.progress goes (workers.progress.ProgressReporter: throttled writes)."""

    def report(self, fraction: float, message: str | None) -> None: ...

    def flush_if_due(self) -> None: ...


PROGRESS_MESSAGE_MAX_CHARS = 1000


def checked_progress(fraction: Any, message: Any = None) -> tuple[float, str | None]:
    """ctx.progress's arguments as stored, or ValueError / TypeError saying what is wrong."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise TypeError(
            f"ctx.progress(fraction): fraction must be a number from 0 to 1, "
            f"not {type(fraction).__name__}"
        )
    if math.isnan(fraction) or not 0 <= fraction <= 1:
        raise ValueError(f"ctx.progress(fraction): fraction must be from 0 to 1, got {fraction!r}")
    if message is not None and not isinstance(message, str):
        raise TypeError(
            f"ctx.progress(message=): message must be a string or None, "
            f"not {type(message).__name__}"
        )
    if message is not None:
        # Written out as log lines are: jsonb refuses U+0000 and unpaired surrogates, and the
        # failed write would fail the attempt it reports on.
        message = storable.escaped(message[:PROGRESS_MESSAGE_MAX_CHARS])
    return float(fraction), message


def trace_env(ctx: Context) -> dict[str, str]:
    """TRACEPARENT for a child process, when the execution carries a trace context."""
    return {"TRACEPARENT": ctx.traceparent} if ctx.traceparent else {}


class AgentLog:
    """`ctx.log`: `ctx.log.info("message", key=value, ...)`."""

    def __init__(self, buffer: LogLines) -> None:
        self._buffer = buffer

    def _emit(self, level: str, message: Any, fields: dict[str, Any]) -> None:
        self._buffer.add(LEVELS[level], str(message), fields)

    def debug(self, message: Any, **fields: Any) -> None:
        self._emit("debug", message, fields)

    def info(self, message: Any, **fields: Any) -> None:
        self._emit("info", message, fields)

    def warning(self, message: Any, **fields: Any) -> None:
        self._emit("warning", message, fields)

    def error(self, message: Any, **fields: Any) -> None:
        self._emit("error", message, fields)

    def flush_if_due(self) -> None:
        self._buffer.flush_if_due()


class Suspended(BaseException):
    """A durable call must wait (a child, a sleep, an event): the run ends here and the
    execution waits. A BaseException, so that an agent's `except Exception` cannot swallow it."""

    def __init__(self, wait: Any) -> None:
        super().__init__("the execution waits")
        self.wait = wait


class Nondeterministic(BaseException):
    """A replay asked for other durable calls than the journal holds: the execution fails with
    `nondeterministic` (never retried: it would differ again)."""


class ChildFailed(Exception):
    """ctx.run / ctx.wait: a child execution did not succeed; carries its status and error."""

    def __init__(self, execution_id: str, agent: str, status: str, error: dict | None) -> None:
        self.execution_id = execution_id
        self.agent = agent
        self.status = status
        self.error = error or {"type": status, "message": "", "hint": ""}
        super().__init__(
            f"child execution {execution_id} ({agent}) {status}: "
            f"{self.error.get('type')}: {self.error.get('message')}"
            + (f" (hint: {self.error['hint']})" if self.error.get("hint") else "")
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "agent": self.agent,
            "status": self.status,
            "error": self.error,
        }


class DurableCalls(Protocol):
    """The journal behind ctx's durable calls (workers/durable.py)."""

    def step_begin(self, name: str) -> tuple[bool, int, Any]: ...

    def step_record(self, seq: int, name: str, value: Any) -> Any: ...

    def abandon(self, seq: int) -> None: ...

    def start(self, agent: str, payload: Any, version: str | None = None) -> str: ...

    def wait(self, ids: list[str]) -> list[Any]: ...

    def sleep(self, seconds: float) -> None: ...

    def sleep_until(self, when: Any) -> None: ...

    def wait_for_event(
        self, name: str, match: dict | None, timeout_seconds: float, lookback_seconds: float
    ) -> Any: ...


class Context:
    """The `ctx` argument of an agent: who it is, its config, its log, its progress, its trace
    context, cancellation, and the durable calls (steps, children, sleeps, event waits)."""

    # With the child runtimes' 1 s grace, a cancelled script or command is gone within 2 s.
    CANCEL_CHECK_SECONDS = 0.5

    def __init__(
        self,
        *,
        execution_id: uuid.UUID,
        attempt: int,
        agent: dict[str, str],
        config: dict[str, Any],
        log: AgentLog,
        check_cancel: Callable[[], bool],
        progress: ProgressSink | None = None,
        traceparent: str | None = None,
        durable: DurableCalls | None = None,
        state: Any = None,
        issue_token: Callable[[], str] | None = None,
        documents: DocumentSource | None = None,
        wallet: WalletGateway | None = None,
    ) -> None:
        self.execution_id = str(execution_id)
        self.attempt = attempt
        self.agent = agent
        self.config = config
        self.log = log
        # The W3C traceparent the execution was submitted with, or None.
        self.traceparent = traceparent
        self._progress = progress
        self._check_cancel = check_cancel
        self._cancelled = False
        self._checked_at = 0.0
        self._durable = durable
        # ctx.state: the agent's key/value state (workers/agent_state.py).
        self.state = state
        self._issue_token = issue_token
        self._token: str | None = None
        # Read on first use only (workers/context_documents.py).
        self._documents = HandedDocuments(documents)
        # ctx.wallet.address, ctx.wallet.transfer (workers/context_wallet.py).
        self.wallet = Wallet(self._calls, wallet, APPROVAL_TIMEOUT_SECONDS)

    def cancelled(self) -> bool:
        """True once a cancel was asked; asks the database at most every CANCEL_CHECK_SECONDS."""
        if not self._cancelled and time.monotonic() - self._checked_at >= self.CANCEL_CHECK_SECONDS:
            self._checked_at = time.monotonic()
            self._cancelled = self._check_cancel()
        return self._cancelled

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the agent is (0..1) and, optionally, what it is doing; shown on the
        execution and its event stream. A fraction outside 0..1 raises ValueError."""
        fraction, message = checked_progress(fraction, message)
        if self._progress is not None:
            self._progress.report(fraction, message)

    def flush_if_due(self) -> None:
        """Write log lines and progress that waited past their interval (called by the python
        watchdog's thread for an agent that went quiet, and by the child runtimes' loop)."""
        self.log.flush_if_due()
        if self._progress is not None:
            self._progress.flush_if_due()

    @property
    def documents(self) -> list[dict[str, Any]]:
        """The documents the execution was handed: `[{"id", "name", "content_type", "size"}]`
        in the submit's order (read from the database on first use)."""
        return self._documents.listed()

    def document(self, document_id: str) -> Document:
        """One of ctx.documents, to `.read()` (bytes) or `.text()`; LookupError for another."""
        return self._documents.open(document_id)

    def write_documents(self, directory: Path) -> HandedFiles:
        """The documents as files in `directory`, for a child process (script, command)."""
        return self._documents.write_files(directory)

    def mark_cancelled(self) -> None:
        """The watchdog saw the cancel request: no need to ask the database again."""
        self._cancelled = True

    def execution_token(self) -> str:
        """The run's own API token (RUNYARD_EXECUTION_TOKEN for `command` agents, the
        `execution_token` of an `http` agent's request), issued on first use."""
        if self._token is None:
            if self._issue_token is None:
                raise RuntimeError("no execution token in this run")
            self._token = self._issue_token()
        return self._token

    # Durable calls (API.md, "Agents working together"): each is recorded in the execution's
    # journal and answered from it when the agent runs again after a wait or a retry.

    def _calls(self) -> DurableCalls:
        if self._durable is None:
            raise RuntimeError("durable calls are not available in this run")
        return self._durable

    def step(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` once per execution; its JSON result is recorded and returned again on
        every later run, without calling `fn`."""
        if not isinstance(name, str) or not name:
            raise TypeError("ctx.step(name, fn, *args): name must be a non-empty string")
        found, seq, result = self._calls().step_begin(name)
        if found:
            return result
        try:
            value = fn(*args)
        except BaseException:
            self._calls().abandon(seq)  # not recorded: a step tried again takes its number
            raise
        return self._calls().step_record(seq, name, value)

    def start(self, agent: str, input: Any, version: str | None = None) -> str:
        """Start a child execution of `agent` (name or id); its id, at once."""
        return self._calls().start(agent, input, version)

    def wait(self, ids: list[str]) -> list[Any]:
        """The outputs of children started with ctx.start, in order, once all have ended;
        raises ChildFailed for the first one (in order) that did not succeed."""
        return self._calls().wait(list(ids))

    def run(self, agent: str, input: Any, version: str | None = None) -> Any:
        """Start a child execution and return its output once it succeeded (ChildFailed
        otherwise). The execution waits meanwhile, holding no worker."""
        return self.wait([self.start(agent, input, version)])[0]

    def sleep(self, seconds: float) -> None:
        """A durable sleep of at least 1 s: the execution waits, holding no worker."""
        self._calls().sleep(seconds)

    def sleep_until(self, when: Any) -> None:
        """Sleep until `when` (an aware datetime, or ISO 8601 text with its offset)."""
        self._calls().sleep_until(when)

    def wait_for_event(
        self,
        name: str,
        match: dict | None = None,
        timeout_seconds: float = 3600,
        lookback_seconds: float = 0,
    ) -> Any:
        """The data of the first event `name` whose data matches `match` (dotted path ->
        value), or None after `timeout_seconds`; an event sent up to `lookback_seconds` before
        the wait counts."""
        return self._calls().wait_for_event(name, match, timeout_seconds, lookback_seconds)

    def answer(self, op: str, args: list[Any]) -> tuple[dict[str, Any], Any]:
        """A durable call made by a `script` agent's process (script_child.py), as the reply
        it reads, and the wait when the call suspended the run (None otherwise)."""
        try:
            return {"ok": self._call(op, args)}, None
        except Suspended as suspended:
            return {"suspend": True}, suspended.wait
        except Nondeterministic as exc:
            return {"nondeterministic": str(exc)}, None
        except ChildFailed as exc:
            return {"raise": "ChildFailed", "message": str(exc), "child": exc.as_dict()}, None
        except TransferRefused as exc:
            refused = {"raise": "TransferRefused", "message": exc.reason, "decision": exc.decision}
            return refused, None
        except Exception as exc:
            kind = type(exc).__name__
            if kind not in ("TypeError", "StateConflict"):
                refused = isinstance(exc, ValueError) or kind == "ValidationFailed"
                kind = "ValueError" if refused else "RuntimeError"
            return {"raise": kind, "message": str(exc)}, None

    def _call(self, op: str, args: list[Any]) -> Any:
        calls = self._calls()
        if op == "step.begin":
            return list(calls.step_begin(*args))
        if op == "step.record":
            return calls.step_record(*args)
        if op == "step.abandon":
            return calls.abandon(*args)
        if op in ("start", "wait", "sleep", "sleep_until", "wait_for_event"):
            return getattr(calls, op)(*args)
        if op == "wallet.transfer":
            return self.wallet.transfer(*args)
        if op == "wallet.address":
            return self.wallet.address
        if op.startswith("state.") and self.state is not None:
            method = op.removeprefix("state.")
            if method in ("get", "entry", "set", "delete"):
                return getattr(self.state, method)(*args)
        raise ValueError(f"unknown durable call {op!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "attempt": self.attempt,
            "agent": self.agent,
            "config": self.config,
            "traceparent": self.traceparent,
        }
