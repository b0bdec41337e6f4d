"""The `script` runtime: the version's Python source, run in a child process of the worker.

The child runs in its own session (process group) with an empty environment but for PATH and
locale, in a fresh temporary directory. Timeout and cancel kill the whole group.
"""

from __future__ import annotations

import contextlib
import json
import os
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
    with tempfile.TemporaryDirectory(prefix="runyard-script-") as workdir:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": workdir,
            "RUNYARD_CONTROL_FD": str(control_write),
        }
        process = subprocess.Popen(
            # -I: isolated from the worker's environment; -u: prints reach us line by line, in
            # order with ctx.log (-I makes Python ignore PYTHONUNBUFFERED).
            [sys.executable, "-I", "-u", str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(control_write,),
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
        os.close(control_write)
        result: dict[str, Any] = {}

        def on_control(line: str) -> None:
            if not line:
                return
            message = json.loads(line)
            if "log" in message:
                level, text, fields = message["log"]
                add(level, text, fields or None)
            else:
                result.update(message)

        streams = {
            process.stdout.fileno(): ByteLines(lambda line: add(LEVELS["info"], line)),
            process.stderr.fileno(): ByteLines(lambda line: add(LEVELS["warning"], line)),
            control_read: ByteLines(on_control),
        }
        try:
            process.stdin.write(request)
            process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            outcome = _pump(process, streams, spec, ctx, logs, started)
        except SoftTimeLimitExceeded:
            # Celery's backstop fired before our own deadline did (a stalled read, say).
            _kill_group(process.pid)
            outcome = Outcome(
                error_type="timeout",
                error_message=f"killed after timeout_seconds={spec.timeout_seconds}",
            )
        for lines in streams.values():
            lines.close()
        os.close(control_read)
        process.stdout.close()
        process.stderr.close()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        # Whatever the script left running in its group goes with it.
        _kill_group(process.pid)
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


def _pump(
    process: subprocess.Popen,
    streams: dict[int, ByteLines],
    spec: VersionSpec,
    ctx: Context,
    logs: LogBuffer,
    started: float,
) -> Outcome:
    """Read the child's pipes until they close, enforcing the timeout and cancellation."""
    deadline = started + spec.timeout_seconds
    kill_at: float | None = None
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
            now = time.perf_counter()
            if outcome.ok and not outcome.cancelled:
                if now >= deadline:
                    _kill_group(process.pid)
                    outcome = Outcome(
                        error_type="timeout",
                        error_message=f"killed after timeout_seconds={spec.timeout_seconds}",
                    )
                elif ctx.cancelled():
                    _kill_group(process.pid, signal.SIGUSR1)
                    kill_at = now + CANCEL_GRACE_SECONDS
                    outcome = Outcome(
                        error_type="cancelled",
                        error_message="cancelled while running",
                        cancelled=True,
                    )
            if kill_at is not None and now >= kill_at:
                _kill_group(process.pid)
                kill_at = None
    return outcome
