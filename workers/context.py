"""What an agent receives as `ctx`, and the interface its log lines go through.

No database here: the runtimes import this module. The buffer that writes the lines is
workers/logbuffer.py's, handed to the runtime by the runner.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from app.executions.spec import LEVELS


class LogLines(Protocol):
    """Where a runtime sends what the agent prints and logs (workers.logbuffer.LogBuffer)."""

    def add(self, level: int, message: str, fields: dict[str, Any] | None = None) -> None: ...

    def flush_if_due(self) -> None: ...


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


class Context:
    """The `ctx` argument of an agent: who it is, its config, its log, and cancellation."""

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
    ) -> None:
        self.execution_id = str(execution_id)
        self.attempt = attempt
        self.agent = agent
        self.config = config
        self.log = log
        self._check_cancel = check_cancel
        self._cancelled = False
        self._checked_at = 0.0

    def cancelled(self) -> bool:
        """True once a cancel was asked; asks the database at most every CANCEL_CHECK_SECONDS."""
        if not self._cancelled and time.monotonic() - self._checked_at >= self.CANCEL_CHECK_SECONDS:
            self._checked_at = time.monotonic()
            self._cancelled = self._check_cancel()
        return self._cancelled

    def mark_cancelled(self) -> None:
        """The watchdog saw the cancel request: no need to ask the database again."""
        self._cancelled = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "attempt": self.attempt,
            "agent": self.agent,
            "config": self.config,
        }
