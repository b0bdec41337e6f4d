"""Workers and a beat of a test's own, with short leases, and the processes a fault kills."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

from tests.beat import BeatProcess
from tests.conftest import celery_worker
from tests.faults.harness import psycopg_dsn

LEASE_SECONDS = 5.0
SWEEP_INTERVAL_SECONDS = 1.0
# Workers and beat both read these: the lease the claim sets and the worker renews, the sweeper's
# pace, and how soon it republishes a requeued execution.
SHORT_LEASES = {
    "RUNYARD_LEASE_SECONDS": str(LEASE_SECONDS),
    "RUNYARD_SWEEP_INTERVAL_SECONDS": str(SWEEP_INTERVAL_SECONDS),
    "RUNYARD_DISPATCH_GRACE_SECONDS": "1",
}


@contextlib.contextmanager
def sweeping_beat(directory: Path, name: str = "beat") -> Iterator[BeatProcess]:
    beat = BeatProcess(directory, name, env=SHORT_LEASES)
    try:
        beat.wait_ready()
        yield beat
    finally:
        beat.stop()


def short_lease_worker(directory: Path, name: str, queue: str, concurrency: int = 2):
    return celery_worker(
        directory / f"{name}.log",
        queues=queue,
        concurrency=concurrency,
        name=name,
        env=SHORT_LEASES,
    )


def children(pid: int) -> list[int]:
    """Direct children of a process (read from /proc: `ps` may not be installed)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def kill_worker(process: subprocess.Popen) -> None:
    """SIGKILL the whole worker at once: main process, pool and whatever the agents started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def connect(database_url: str) -> psycopg.Connection:
    return psycopg.connect(psycopg_dsn(database_url), autocommit=True)


def rows(database_url: str, ids: list[uuid.UUID], columns: str) -> dict[uuid.UUID, tuple]:
    with connect(database_url) as conn:
        return {
            row[0]: row[1:]
            for row in conn.execute(
                f"SELECT id, {columns} FROM executions WHERE id = ANY(%s)", (ids,)
            ).fetchall()
        }


def wait_until_running(database_url: str, ids: list[uuid.UUID], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        statuses = rows(database_url, ids, "status")
        if all(statuses.get(i) == ("running",) for i in ids):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not all running after {timeout}s: {statuses}")
        time.sleep(0.05)
