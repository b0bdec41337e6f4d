"""The child process of a `script` or `command` execution, from start to reap.

The child runs in a session (process group) of its own, under kernel limits it sets on itself
before exec (limited_exec.py), with a scrubbed environment. While it runs, this module reads its
pipes, and a watchdog samples the whole group every POLL_SECONDS: resident memory, CPU seconds
and process count against the agent's limits. A limit, the timeout or a cancel ends the whole
group, and so does the end of the leader: nothing the agent started outlives its execution,
short of a process that starts a session of its own (see the README on script security).
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Celery's soft time limit, raised in the pool process by billiard (celery.exceptions re-exports
# it): runtimes know the pool they run in, not Celery.
from billiard.exceptions import SoftTimeLimitExceeded

from app.config import current_config
from app.executions.spec import VersionSpec
from workers.context import Context, LogLines
from workers.runtimes import Outcome
from workers.runtimes.lines import ByteLines

LAUNCHER = Path(__file__).with_name("limited_exec.py")
POLL_SECONDS = 0.1
# After a cancel the child gets this long to stop on its own before it is killed; with the
# cancel check every 0.5 s (Context) and the 0.1 s poll, a running child is gone about 1.1 s
# after the request, well inside the 2 s the API promises.
CANCEL_GRACE_SECONDS = 0.5
MIB = 1024 * 1024
_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / MIB
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass(frozen=True)
class ChildLimits:
    memory_mb: int | None
    cpu_seconds: int | None
    file_size_mb: int
    max_processes: int

    @classmethod
    def for_spec(cls, spec: VersionSpec) -> ChildLimits:
        cfg = current_config()
        return cls(
            memory_mb=spec.limits.get("memory_mb"),
            cpu_seconds=spec.limits.get("cpu_seconds"),
            file_size_mb=cfg.child_max_file_mb,
            max_processes=cfg.child_max_processes,
        )

    def rlimits(self) -> dict[str, tuple[int, int]]:
        """What limited_exec.py sets on the child before exec (inherited by its children)."""
        file_size = self.file_size_mb * MIB
        limits = {"RLIMIT_CORE": (0, 0), "RLIMIT_FSIZE": (file_size, file_size)}
        if self.memory_mb:
            # memory_mb itself is enforced by the watchdog on the group's resident memory; this
            # per-process bound only stops an allocation burst quicker than its sampling.
            data = 2 * self.memory_mb * MIB
            limits["RLIMIT_DATA"] = (data, data)
        if self.cpu_seconds:
            # Per process: SIGXCPU at the soft limit, SIGKILL a second later.
            limits["RLIMIT_CPU"] = (self.cpu_seconds, self.cpu_seconds + 1)
        if os.getuid() != 0:
            # RLIMIT_NPROC counts every process of the user (and root ignores it): leave room
            # for what already runs; the watchdog counts the group itself.
            nproc = _user_process_count(os.getuid()) + self.max_processes
            limits["RLIMIT_NPROC"] = (nproc, nproc)
        return limits


def _user_process_count(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += 1
    return count


@dataclass
class GroupSample:
    processes: int = 0
    rss_mb: float = 0.0
    cpu_seconds: float = 0.0


def sample_group(pgid: int) -> GroupSample:
    """Live processes of a process group, from /proc: count, summed RSS and CPU (theirs and
    what they reaped). Summed RSS counts shared pages once per process: an upper bound."""
    sample = GroupSample()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                raw = stat.read()
        except OSError:
            continue  # it ended while we looked
        # Fields after "(comm)": state, ppid, pgrp, ... utime(14) stime cutime cstime ... rss(24)
        fields = raw[raw.rindex(b")") + 2 :].split()
        if int(fields[2]) != pgid or fields[0] == b"Z":
            continue
        sample.processes += 1
        sample.cpu_seconds += sum(int(value) for value in fields[11:15]) / _CLOCK_TICKS
        sample.rss_mb += int(fields[21]) * _PAGE_MB
    return sample


@dataclass
class ChildRun:
    outcome: Outcome
    returncode: int | None = None
    usage: dict[str, Any] = field(default_factory=dict)


def run_child(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str,
    stdin: bytes,
    spec: VersionSpec,
    ctx: Context,
    logs: LogLines,
    on_stdout: Callable[[str], None],
    on_stderr: Callable[[str], None],
    control: tuple[int, int, ByteLines] | None = None,
    cancel_signal: int = signal.SIGTERM,
    child_peak_rss_mb: Callable[[], float] = lambda: 0.0,
    extra_fds: tuple[int, ...] = (),
) -> ChildRun:
    """Start `argv` under the spec's limits, feed it `stdin`, route its lines, and supervise it
    until it and its group are gone. `control` is an extra pipe the child writes lines to:
    (read end, write end passed to the child, where its lines go). `extra_fds` are passed to
    the child too, and closed here once it started (the read end of a reply pipe)."""
    limits = ChildLimits.for_spec(spec)
    launch_env = {**env, "RUNYARD_CHILD_LIMITS": json.dumps(limits.rlimits())}
    started = time.perf_counter()
    pass_fds = (() if control is None else (control[1],)) + extra_fds
    try:
        process = _launch(argv, launch_env, cwd, pass_fds)
    except OSError as exc:
        if control is not None:
            os.close(control[0])
        return ChildRun(
            Outcome(
                error_type="runtime_error",
                error_message=f"cannot start the process (cwd {cwd!r}): {exc}",
                retryable=False,
                hint="check that the runtime's cwd exists on the worker and is readable",
            )
        )
    finally:
        for fd in pass_fds:
            os.close(fd)
    streams = {
        process.stdout.fileno(): ByteLines(on_stdout),
        process.stderr.fileno(): ByteLines(on_stderr),
    }
    if control is not None:
        streams[control[0]] = control[2]
    supervisor = _Supervisor(process, limits, spec, ctx, logs, cancel_signal, started)
    outcome, rusage = _supervise_to_the_end(supervisor, streams, stdin, control)
    cpu_seconds = max(rusage.ru_utime + rusage.ru_stime, supervisor.peak.cpu_seconds)
    if outcome.ok and not outcome.cancelled:
        outcome = _limit_from_exit(process.returncode, limits, cpu_seconds) or outcome
    return ChildRun(
        outcome,
        process.returncode,
        {
            "cpu_seconds": round(cpu_seconds, 4),
            "max_rss_mb": round(
                max(child_peak_rss_mb() or rusage.ru_maxrss / 1024, supervisor.peak.rss_mb), 1
            ),
            "wall_ms": round((time.perf_counter() - started) * 1000),
        },
    )


def _launch(
    argv: list[str], env: dict[str, str], cwd: str, pass_fds: tuple[int, ...]
) -> subprocess.Popen:
    """The launcher (limited_exec.py) running `argv`, in a session of its own."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", str(LAUNCHER), *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )


def _supervise_to_the_end(
    supervisor: _Supervisor,
    streams: dict[int, ByteLines],
    stdin: bytes,
    control: tuple[int, int, ByteLines] | None,
) -> tuple[Outcome, resource.struct_rusage]:
    """Pump the child's pipes until it is done, then kill what is left of its group, close
    every descriptor and reap it: the outcome and the child's resource usage."""
    process = supervisor.process
    try:
        outcome = supervisor.pump(streams, stdin)
    except SoftTimeLimitExceeded:
        # Celery's backstop fired before our own deadline did.
        outcome = Outcome(
            error_type="timeout",
            error_message=f"killed after timeout_seconds={supervisor.spec.timeout_seconds}",
        )
    finally:
        # Whatever happened, nothing of the child outlives this call, and every descriptor and
        # the zombie are gone even if flushing the last lines fails.
        kill_group(process.pid)
        try:
            for lines in streams.values():
                lines.close()
        finally:
            if control is not None:
                os.close(control[0])
            for pipe in (process.stdin, process.stdout, process.stderr):
                with contextlib.suppress(OSError):
                    pipe.close()
            rusage = supervisor.reap()
    return outcome, rusage


def _limit_from_exit(returncode: int | None, limits: ChildLimits, cpu: float) -> Outcome | None:
    """The kernel's own limits end a process with a signal: name the limit it crossed. A shell
    whose child died so exits with 128 + the signal number, which counts too."""

    def ended_by(sig: int) -> bool:
        return returncode in (-sig, 128 + sig)

    if ended_by(signal.SIGXFSZ):
        return Outcome(
            error_type="file_size_limit",
            error_message=f"wrote a file over {limits.file_size_mb} MB and was stopped (SIGXFSZ)",
        )
    if limits.cpu_seconds and (
        ended_by(signal.SIGXCPU) or (ended_by(signal.SIGKILL) and cpu >= limits.cpu_seconds)
    ):
        return Outcome(
            error_type="cpu_limit",
            error_message=f"used {cpu:.1f} s of CPU, over limits.cpu_seconds={limits.cpu_seconds}",
        )
    return None


class _Supervisor:
    def __init__(
        self,
        process: subprocess.Popen,
        limits: ChildLimits,
        spec: VersionSpec,
        ctx: Context,
        logs: LogLines,
        cancel_signal: int,
        started: float,
    ) -> None:
        self.process = process
        self.limits = limits
        self.spec = spec
        self.ctx = ctx
        self.logs = logs
        self.cancel_signal = cancel_signal
        self.started = started
        self.peak = GroupSample()
        self.rusage: resource.struct_rusage | None = None

    def exited(self) -> bool:
        if self.rusage is None:
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid:
                self.process.returncode = os.waitstatus_to_exitcode(status)
                self.rusage = usage
        return self.rusage is not None

    def reap(self) -> resource.struct_rusage:
        """wait4, so the child's own resource usage comes back (and its waited-for children's)."""
        if self.rusage is None:
            _, status, self.rusage = os.wait4(self.process.pid, 0)
            self.process.returncode = os.waitstatus_to_exitcode(status)
        return self.rusage

    def pump(self, streams: dict[int, ByteLines], stdin: bytes) -> Outcome:
        """Feed stdin and read the pipes until they close, enforcing the timeout, the limits and
        a cancel all along (a child that never reads its input is still bounded)."""
        pid = self.process.pid
        deadline = self.started + self.spec.timeout_seconds
        kill_grace = current_config().kill_grace_seconds
        next_sample = self.started + POLL_SECONDS
        kill_at: float | None = None
        drain_until: float | None = None
        group_killed = False
        outcome = Outcome()
        stdin_fd = self.process.stdin.fileno()
        pending = memoryview(stdin)
        with selectors.DefaultSelector() as selector:
            for fd in streams:
                os.set_blocking(fd, False)
                selector.register(fd, selectors.EVENT_READ)
            os.set_blocking(stdin_fd, False)
            selector.register(stdin_fd, selectors.EVENT_WRITE)
            while selector.get_map():
                for key, _ in selector.select(timeout=POLL_SECONDS):
                    if key.fd == stdin_fd:
                        pending = self._feed(selector, stdin_fd, pending)
                        continue
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        streams[key.fd].feed(chunk)
                    else:
                        selector.unregister(key.fd)
                # Lines (and progress) show up while a long child runs, not only when it ends.
                self.logs.flush_if_due()
                self.ctx.flush_if_due()
                now = time.perf_counter()
                if not group_killed and self.exited():
                    # The leader is done; what it left running in the background would hold the
                    # pipes open until the timeout. The group goes with the leader, and a process
                    # that left the group gets a moment to finish writing, no more.
                    kill_group(pid)
                    group_killed = True
                    drain_until = now + POLL_SECONDS * 5
                if drain_until is not None and now >= drain_until:
                    break
                if outcome.ok and not outcome.cancelled and not group_killed:
                    if now >= deadline:
                        # Soft, then hard: SIGTERM lets the child clean up, SIGKILL follows.
                        kill_group(pid, signal.SIGTERM)
                        kill_at = now + kill_grace
                        outcome = Outcome(
                            error_type="timeout",
                            error_message=f"stopped after timeout_seconds="
                            f"{self.spec.timeout_seconds} (SIGTERM, then SIGKILL after "
                            f"{kill_grace:g} s)",
                        )
                    elif now >= next_sample:
                        next_sample = now + POLL_SECONDS
                        outcome = self._check_limits(sample_group(pid)) or outcome
                        if not outcome.ok:
                            kill_group(pid)
                    if outcome.ok and self.ctx.cancelled():
                        kill_group(pid, self.cancel_signal)
                        kill_at = now + CANCEL_GRACE_SECONDS
                        outcome = Outcome(
                            error_type="cancelled",
                            error_message="cancelled while running",
                            cancelled=True,
                        )
                if kill_at is not None and now >= kill_at:
                    kill_group(pid)
                    kill_at = None
        return outcome

    def _feed(self, selector: selectors.BaseSelector, fd: int, pending: memoryview) -> memoryview:
        try:
            written = os.write(fd, pending[:65536])
        except BlockingIOError:
            return pending
        except BrokenPipeError:
            written = len(pending)  # the child closed its stdin: it wants no more
        pending = pending[written:]
        if not pending:
            selector.unregister(fd)
            self.process.stdin.close()
        return pending

    def _check_limits(self, sample: GroupSample) -> Outcome | None:
        peak = self.peak
        peak.processes = max(peak.processes, sample.processes)
        peak.rss_mb = max(peak.rss_mb, sample.rss_mb)
        peak.cpu_seconds = max(peak.cpu_seconds, sample.cpu_seconds)
        limits = self.limits
        if limits.memory_mb and sample.rss_mb > limits.memory_mb:
            return Outcome(
                error_type="memory_limit",
                error_message=f"used {sample.rss_mb:.0f} MB of resident memory in "
                f"{sample.processes} process(es), over limits.memory_mb={limits.memory_mb}",
            )
        if limits.cpu_seconds and sample.cpu_seconds > limits.cpu_seconds:
            return Outcome(
                error_type="cpu_limit",
                error_message=f"used {sample.cpu_seconds:.1f} s of CPU in {sample.processes} "
                f"process(es), over limits.cpu_seconds={limits.cpu_seconds}",
            )
        if sample.processes > limits.max_processes:
            return Outcome(
                error_type="process_limit",
                error_message=f"ran {sample.processes} processes at once, over "
                f"RUNYARD_CHILD_MAX_PROCESSES={limits.max_processes}",
            )
        return None
