"""Real `celery -A workers beat` processes for the schedule tests, always stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY = b"schedules from PostgreSQL"
# Short enough that a test never waits long for beat to notice an edit.
POLL_SECONDS = "0.2"


class BeatProcess:
    def __init__(self, directory: Path, name: str, env: dict[str, str] | None = None) -> None:
        self.log_path = directory / f"{name}.log"
        celery = Path(sys.executable).parent / "celery"
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [
                    str(celery),
                    "-A",
                    "workers",
                    "beat",
                    "-l",
                    "INFO",
                    "-s",
                    str(directory / f"{name}-schedule"),
                    f"--pidfile={directory / f'{name}.pid'}",
                ],
                cwd=ROOT,
                env={
                    **os.environ,
                    "PYTHONPATH": str(ROOT),
                    "RUNYARD_SCHEDULE_POLL_SECONDS": POLL_SECONDS,
                    **(env or {}),
                },
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while READY not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"beat did not start:\n{self.log():}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Beats:
    """Starts beat processes on demand; stop_all() ends every one of them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.running: list[BeatProcess] = []

    def start(self, count: int = 1, env: dict[str, str] | None = None) -> list[BeatProcess]:
        started = [
            BeatProcess(self.directory, f"beat-{len(self.running) + i}", env) for i in range(count)
        ]
        self.running.extend(started)
        for beat in started:
            beat.wait_ready()
        return started

    def stop_all(self) -> None:
        for beat in self.running:
            beat.stop()
        self.running.clear()
