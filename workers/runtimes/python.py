"""The `python` runtime: `module:function` from an allowed package, called in the pool process.

It runs inside the Celery pool process, so what it can bound is limited: the soft time limit
raises SoftTimeLimitExceeded in the agent (recorded as `timeout`); a cancel, or an agent that
ignores the soft limit, is handled by workers/watchdog.py (interrupt, then kill the pool process).
Memory, CPU seconds and child processes are not bounded per execution here; use the `script` or
`command` runtime for untrusted or heavy code.
"""

from __future__ import annotations

import importlib
import resource
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

# Celery's soft time limit, raised in the pool process by billiard (celery.exceptions re-exports
# it): runtimes know the pool they run in, not Celery.
from billiard.exceptions import SoftTimeLimitExceeded

from app.config import current_config
from app.executions.spec import LEVELS, VersionSpec
from workers.context import Context, LogLines, Nondeterministic, Suspended
from workers.runtimes import Outcome, nondeterministic
from workers.runtimes.lines import LineWriter


def run(spec: VersionSpec, payload: dict[str, Any], ctx: Context, logs: LogLines) -> Outcome:
    module_name, _, function_name = spec.runtime["entrypoint"].partition(":")
    if not current_config().allows_module(module_name):
        return Outcome(
            error_type="runtime_error",
            error_message=f"module {module_name!r} is outside RUNYARD_AGENT_MODULES here",
        )
    stdout = LineWriter(lambda line: logs.add(LEVELS["info"], line))
    stderr = LineWriter(lambda line: logs.add(LEVELS["warning"], line))
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    outcome = Outcome()
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                function = getattr(importlib.import_module(module_name), function_name)
            except (ImportError, AttributeError) as exc:
                outcome = Outcome(
                    error_type="runtime_error",
                    error_message=f"cannot load {spec.runtime['entrypoint']}: {exc}",
                )
            else:
                outcome.output = function(payload, ctx)
    except Suspended as suspended:
        outcome = Outcome(suspended=suspended.wait)
    except Nondeterministic as exc:
        outcome = nondeterministic(str(exc))
    except SoftTimeLimitExceeded:
        outcome = Outcome(
            error_type="timeout",
            error_message=f"did not finish within timeout_seconds={spec.timeout_seconds}",
        )
    except Exception as exc:
        ctx.log.error("".join(traceback.format_exception(exc)).rstrip())
        outcome = Outcome(error_type="runtime_error", error_message=f"{type(exc).__name__}: {exc}")
    finally:
        stdout.flush()
        stderr.flush()
    after = resource.getrusage(resource.RUSAGE_SELF)
    outcome.usage = {
        "cpu_seconds": round(
            (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 4
        ),
        # The pool process's peak: the python runtime shares its process with the worker.
        "max_rss_mb": round(after.ru_maxrss / 1024, 1),
        "wall_ms": round((time.perf_counter() - started) * 1000),
    }
    if not outcome.ok and ctx.cancelled():
        outcome.cancelled = True
    return outcome
