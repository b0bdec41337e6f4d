"""The `script` runtime: the version's Python source, run in a child process of the worker.

The child runs in its own session (process group) with an empty environment but for PATH and
locale, in a fresh temporary directory. Timeout and cancel kill the whole group.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from app.executions.models import LEVELS
from app.executions.services import VersionSpec
from workers.context import Context, LogBuffer
from workers.runtimes import Outcome
from workers.runtimes.lines import ByteLines

CHILD = Path(__file__).with_name("script_child.py")
# After a cancel the script gets this long to notice ctx.cancelled() before it is killed.
CANCEL_GRACE_SECONDS = 1.0
POLL_SECONDS = 0.2
# Above the largest `limits.max_output_bytes` schemas/agent.json allows (64 MiB).
CONTROL_LINE_MAX_BYTES = 80 * 1024 * 1024


def _kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def run(spec: VersionSpec, payload: dict[str, Any], ctx: Context, logs: LogBuffer) -> Outcome:
    add = logs.add
    control_read, control_write = os.pipe()
    request = json.dumps(
        {"source": spec.runtime["source"], "input": payload, "ctx": ctx.as_dict()}
    ).encode()
    started = time.perf_counter()
    result: dict[str, Any] = {}

    def on_control(line: str) -> None:
        if not line:
            return
        try:
            message = json.loads(line)
            if "log" in message:
                level, text, fields = message["log"]
                add(int(level), str(text), fields or None)
            else:
                result.update(message)
        except (ValueError, TypeError, AttributeError):
            # The script wrote on our descriptor itself: keep what it said, as a log line.
            add(LEVELS["warning"], line)

    with tempfile.TemporaryDirectory(prefix="runyard-script-") as workdir:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": workdir,
            "RUNYARD_CONTROL_FD": str(control_write),
        }
        try:
            process = subprocess.Popen(
                # -I: isolated from the worker's environment; -u: prints reach us line by line,
                # in order with ctx.log (-I makes Python ignore PYTHONUNBUFFERED).
                [sys.executable, "-I", "-u", str(CHILD)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(control_write,),
                cwd=workdir,
                env=env,
                start_new_session=True,
            )
        finally:
            os.close(control_write)
        child = Child(process)
        streams = {
            process.stdout.fileno(): ByteLines(lambda line: add(LEVELS["info"], line)),
            process.stderr.fileno(): ByteLines(lambda line: add(LEVELS["warning"], line)),
            # The control channel carries the output as one line: allow it its whole size.
            control_read: ByteLines(on_control, max_bytes=CONTROL_LINE_MAX_BYTES),
        }
        try:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.write(request)
                process.stdin.close()
            outcome = _pump(child, streams, spec, ctx, logs, started)
        except SoftTimeLimitExceeded:
            # Celery's backstop fired before our own deadline did (a stalled read, say).
            outcome = Outcome(
                error_type="timeout",
                error_message=f"killed after timeout_seconds={spec.timeout_seconds}",
            )
        finally:
            # Whatever happened, nothing of the script outlives this call.
            _kill_group(process.pid)
            for lines in streams.values():
                lines.close()
            os.close(control_read)
            process.stdout.close()
            process.stderr.close()
            usage = child.reap()
    outcome.usage = {
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 4),
        "max_rss_mb": round(result.get("usage", {}).get("max_rss_kb", usage.ru_maxrss) / 1024, 1),
        "wall_ms": round((time.perf_counter() - started) * 1000),
    }
    if outcome.error_type or outcome.cancelled:
        return outcome
    if "output" in result:
        outcome.output = result["output"]
        return outcome
    if "error" in result:
        outcome.error_type = result["error"]["type"]
        outcome.error_message = result["error"]["message"]
        return outcome
    outcome.error_type = "runtime_error"
    outcome.error_message = (
        f"the script process ended without a result (exit code {process.returncode})"
    )
    return outcome


class Child:
    """The script's process, reaped with wait4 so its own resource usage comes back."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.usage: resource.struct_rusage | None = None

    def exited(self) -> bool:
        if self.usage is None:
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                self.process.returncode = os.waitstatus_to_exitcode(status)
                self.usage = usage
        return self.usage is not None

    def reap(self) -> resource.struct_rusage:
        if self.usage is None:
            _, status, self.usage = os.wait4(self.process.pid, 0)
            self.process.returncode = os.waitstatus_to_exitcode(status)
        return self.usage


def _pump(
    child: Child,
    streams: dict[int, ByteLines],
    spec: VersionSpec,
    ctx: Context,
    logs: LogBuffer,
    started: float,
) -> Outcome:
    """Read the child's pipes until they close, enforcing the timeout and cancellation."""
    pid = child.process.pid
    deadline = started + spec.timeout_seconds
    kill_at: float | None = None
    group_killed = False
    outcome = Outcome()
    with selectors.DefaultSelector() as selector:
        for fd in streams:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select(timeout=POLL_SECONDS):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    streams[key.fd].feed(chunk)
                else:
                    selector.unregister(key.fd)
            # Lines show up while a long script runs, not only when it ends.
            logs.flush_if_due()
            if not group_killed and child.exited():
                # The script is done; what it started in the background would hold the pipes
                # open until the timeout. The group goes with the script.
                _kill_group(pid)
                group_killed = True
            now = time.perf_counter()
            if outcome.ok and not outcome.cancelled:
                if now >= deadline:
                    _kill_group(pid)
                    outcome = Outcome(
                        error_type="timeout",
                        error_message=f"killed after timeout_seconds={spec.timeout_seconds}",
                    )
                elif ctx.cancelled():
                    _kill_group(pid, signal.SIGUSR1)
                    kill_at = now + CANCEL_GRACE_SECONDS
                    outcome = Outcome(
                        error_type="cancelled",
                        error_message="cancelled while running",
                        cancelled=True,
                    )
            if kill_at is not None and now >= kill_at:
                _kill_group(pid)
                kill_at = None
    return outcome
