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
from app.executions.spec import LEVELS
from workers.context_documents import Document, DocumentSource, HandedDocuments, HandedFiles


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


class Context:
    """The `ctx` argument of an agent: who it is, its config, its log, its progress, its trace
    context, and cancellation."""

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
        documents: DocumentSource | None = None,
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
        # Read on first use only (workers/context_documents.py).
        self._documents = HandedDocuments(documents)

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

    def as_dict(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "attempt": self.attempt,
            "agent": self.agent,
            "config": self.config,
            "traceparent": self.traceparent,
        }
