"""The `script` runtime: the version's Python source, run in a child process of the worker.

The child (script_child.py) gets an empty environment but for PATH and locale, a fresh temporary
directory, and the limits and supervision of workers/runtimes/child.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.config import current_config
from app.executions.spec import LEVELS, VersionSpec
from workers.context import Context, LogLines, trace_env
from workers.runtimes import Outcome
from workers.runtimes.child import run_child
from workers.runtimes.lines import ByteLines

CHILD = Path(__file__).with_name("script_child.py")
# Above the largest `limits.max_output_bytes` schemas/agent.json allows (64 MiB).
CONTROL_LINE_MAX_BYTES = 80 * 1024 * 1024


class _Control:
    """What the script says on its control channel: log lines, progress, durable calls (each
    answered with one line on the reply pipe, whose read end the child gets), and its end."""

    def __init__(self, ctx: Context, logs: LogLines) -> None:
        self._ctx = ctx
        self._add = logs.add
        self.result: dict[str, Any] = {}
        # Set when a durable call made the run wait: what it waits for.
        self.suspended: Any = None
        self.reply_read, self._reply_write = os.pipe()

    def on_line(self, line: str) -> None:
        if not line:
            return
        try:
            message = json.loads(line)
            if "call" in message:
                self._answer(*message["call"])
            elif "log" in message:
                level, text, fields = message["log"]
                self._add(int(level), str(text), fields or None)
            elif "progress" in message:
                self._ctx.progress(*message["progress"])
            else:
                self.result.update(message)
        except (ValueError, TypeError, AttributeError):
            # The script wrote on our descriptor itself: keep what it said, as a log line.
            self._add(LEVELS["warning"], line)

    def _answer(self, op: str, args: list[Any]) -> None:
        reply, wait = self._ctx.answer(op, args)
        if wait is not None and self.suspended is None:  # the first wait is the run's
            self.suspended = wait
        data = (json.dumps(reply, default=repr) + "\n").encode()
        try:
            while data:
                data = data[os.write(self._reply_write, data) :]
        except OSError:
            pass  # the child is gone (killed, or it closed the pipe): nobody reads the answer

    def close(self) -> None:
        os.close(self._reply_write)


def run(spec: VersionSpec, payload: dict[str, Any], ctx: Context, logs: LogLines) -> Outcome:
    add = logs.add
    channel = _Control(ctx, logs)
    result = channel.result
    request = json.dumps(
        {
            "source": spec.runtime["source"],
            "input": payload,
            "ctx": ctx.as_dict(),
            "max_output_bytes": spec.limits.get(
                "max_output_bytes", current_config().max_output_bytes
            ),
            "memory_limited": bool(spec.limits.get("memory_mb")),
        }
    ).encode()
    control_read, control_write = os.pipe()
    with (
        tempfile.TemporaryDirectory(prefix="runyard-script-") as workdir,
        contextlib.closing(channel),
    ):
        handed = ctx.write_documents(Path(workdir) / "documents")
        run = run_child(
            # -I: isolated from the worker's environment; -u: prints reach us line by line,
            # in order with ctx.log (-I makes Python ignore PYTHONUNBUFFERED).
            [sys.executable, "-I", "-u", str(CHILD)],
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "LANG": "C.UTF-8",
                "HOME": workdir,
                "RUNYARD_CONTROL_FD": str(control_write),
                "RUNYARD_REPLY_FD": str(channel.reply_read),
                **trace_env(ctx),
                **handed.env,
            },
            cwd=workdir,
            stdin=handed.added_to(request),
            spec=spec,
            ctx=ctx,
            logs=logs,
            on_stdout=lambda line: add(LEVELS["info"], line),
            on_stderr=lambda line: add(LEVELS["warning"], line),
            # The control channel carries the output as one line: allow it its whole size.
            control=(
                control_read,
                control_write,
                ByteLines(channel.on_line, max_bytes=CONTROL_LINE_MAX_BYTES),
            ),
            # The script's ctx.cancelled() turns true on SIGUSR1; the kill follows the grace.
            cancel_signal=signal.SIGUSR1,
            child_peak_rss_mb=lambda: result.get("usage", {}).get("max_rss_kb", 0) / 1024,
            extra_fds=(channel.reply_read,),
        )
    outcome = run.outcome
    outcome.usage = run.usage
    if outcome.error_type or outcome.cancelled:
        return outcome
    if channel.suspended is not None:
        outcome.suspended = channel.suspended
        return outcome
    if "output" in result:
        outcome.output = result["output"]
        return outcome
    if "error" in result:
        outcome.error_type = result["error"]["type"]
        outcome.error_message = result["error"]["message"]
        outcome.retryable = outcome.error_type != "nondeterministic"
        return outcome
    outcome.error_type = "runtime_error"
    outcome.error_message = (
        f"the script process ended without a result (exit code {run.returncode})"
    )
    return outcome
