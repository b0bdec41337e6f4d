"""The `command` runtime: a program named by `argv`, run in a child process of the worker.

API.md: the input JSON arrives on stdin, RUNYARD_OUTPUT_PATH names the file the program writes
its output JSON object to, every stdout line is logged at info and every stderr line at warning.
argv[0] must be in RUNYARD_ALLOWED_COMMANDS here, on the worker, as well as where the agent was
defined. Limits, timeout and cancel are those of workers/runtimes/child.py.

Progress (ctx.progress of the other runtimes): a line on stdout or stderr that starts with
`runyard:progress ` followed by a fraction from 0 to 1 and, optionally, a message
(`runyard:progress 0.25 parsed the input`). Such a line is progress, not a log line; a
malformed one is logged at warning with what is wrong with it. TRACEPARENT carries the
execution's W3C trace context, when it has one. RUNYARD_DOCUMENTS_DIR names a directory
holding the documents the execution was handed, one file each, under its name made safe.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from app.config import current_config
from app.executions.spec import LEVELS, VersionSpec
from workers.context import Context, LogLines, checked_progress, trace_env
from workers.runtimes import Outcome
from workers.runtimes.child import run_child

STDERR_TAIL_LINES = 5
# What programs print when an allocation fails (Python, C, C++, Go, Node, the JVM).
OUT_OF_MEMORY_SIGNS = (
    "MemoryError",
    "Cannot allocate memory",
    "out of memory",
    "std::bad_alloc",
    "OutOfMemoryError",
)


def run(spec: VersionSpec, payload: dict[str, Any], ctx: Context, logs: LogLines) -> Outcome:
    cfg = current_config()
    argv = list(spec.runtime["argv"])
    if argv[0] not in cfg.allowed_commands:
        return Outcome(
            error_type="runtime_error",
            error_message=f"command {argv[0]!r} is not in RUNYARD_ALLOWED_COMMANDS on this worker",
            retryable=False,
            hint="list it in RUNYARD_ALLOWED_COMMANDS on every worker of the agent's queue",
        )
    # Resolved here, on the worker's own PATH: the agent's env may set PATH for the program, but
    # must not choose which program the allowed name runs.
    program = shutil.which(argv[0])
    if program is None:
        return Outcome(
            error_type="runtime_error",
            error_message=f"command {argv[0]!r} is not installed on this worker (PATH)",
            retryable=False,
            hint="install the program on every worker of the agent's queue",
        )
    argv[0] = program
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    def on_stdout(line: str) -> None:
        if not _progress_line(line, ctx, logs):
            logs.add(LEVELS["info"], line)

    def on_stderr(line: str) -> None:
        if _progress_line(line, ctx, logs):
            return
        stderr_tail.append(line)
        logs.add(LEVELS["warning"], line)

    with tempfile.TemporaryDirectory(prefix="runyard-command-") as workdir:
        output_path = Path(workdir) / "output.json"
        env = _environment(spec, ctx, Path(workdir), output_path)
        run = run_child(
            argv,
            env=env,
            cwd=spec.runtime.get("cwd") or workdir,
            stdin=json.dumps(payload).encode(),
            spec=spec,
            ctx=ctx,
            logs=logs,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )
        outcome = run.outcome
        outcome.usage = run.usage
        if outcome.error_type or outcome.cancelled:
            return outcome
        if run.returncode != 0:
            last = " | ".join(stderr_tail) or "(nothing on stderr)"
            how = (
                f"was killed by signal {-run.returncode}"
                if run.returncode is not None and run.returncode < 0
                else f"exited with code {run.returncode}"
            )
            outcome.error_type = "runtime_error"
            outcome.error_message = f"{argv[0]} {how}; last stderr lines: {last}"
            if spec.limits.get("memory_mb") and any(
                sign in line for line in stderr_tail for sign in OUT_OF_MEMORY_SIGNS
            ):
                # The kernel's data limit (2 x memory_mb) refused an allocation before the
                # watchdog's next sample saw the memory: the same limit, reached sooner.
                outcome.error_type = "memory_limit"
            return outcome
        return _read_output(output_path, spec, cfg.max_output_bytes, outcome)


def _environment(spec: VersionSpec, ctx: Context, workdir: Path, output: Path) -> dict[str, str]:
    """The child's whole environment: the worker's PATH and locale, the agent's env, then what
    Runyard hands every command (its documents written into the work directory)."""
    handed = ctx.write_documents(workdir / "documents")
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(workdir),
        **spec.runtime.get("env", {}),
        # After the agent's env: schemas/agent.json reserves these names anyway.
        "RUNYARD_OUTPUT_PATH": str(output),
        "RUNYARD_EXECUTION_ID": ctx.execution_id,
        "RUNYARD_ATTEMPT": str(ctx.attempt),
        # The run's own token for the API (children, state, events, documents).
        "RUNYARD_EXECUTION_TOKEN": ctx.execution_token(),
        "RUNYARD_API_URL": current_config().agents_api_url,
        **trace_env(ctx),
        **handed.env,
    }


PROGRESS_PREFIX = "runyard:progress "


def _progress_line(line: str, ctx: Context, logs: LogLines) -> bool:
    """Whether `line` is a progress line (then reported, or logged as refused): see above."""
    if not line.startswith(PROGRESS_PREFIX):
        return False
    fraction_text, _, message = line[len(PROGRESS_PREFIX) :].strip().partition(" ")
    try:
        fraction = float(fraction_text)
        ctx.progress(*checked_progress(fraction, message.strip() or None))
    except (TypeError, ValueError) as exc:
        logs.add(
            LEVELS["warning"],
            f"progress line refused ({exc}): expected `{PROGRESS_PREFIX}<0..1> [message]`, "
            f"got {line!r}",
        )
    return True


def _read_output(path: Path, spec: VersionSpec, default_cap: int, outcome: Outcome) -> Outcome:
    cap = spec.limits.get("max_output_bytes", default_cap)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        outcome.error_type = "runtime_error"
        outcome.error_message = (
            "the command exited 0 without writing its output to $RUNYARD_OUTPUT_PATH"
        )
        return outcome
    # Checked before reading: the worker never loads an oversized output into memory.
    if size > cap:
        outcome.error_type = "output_too_large"
        outcome.error_message = f"the output file is {size} bytes, over {cap}"
        return outcome
    try:
        outcome.output = json.loads(path.read_bytes())
    except ValueError as exc:
        outcome.error_type = "output_invalid"
        outcome.error_message = f"$RUNYARD_OUTPUT_PATH does not hold JSON: {exc}"
    return outcome
