"""Runyard's processes are not dumpable, so an agent's process cannot read their environment."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _dumpable_after(code: str) -> str:
    probe = f"{code}\nfrom app.hardening import is_dumpable\nprint(is_dumpable())"
    return subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()


def test_celery_processes_are_undumpable():
    # Worker, beat and flower load celeryconfig through the Celery app.
    assert _dumpable_after("import workers; workers.app.loader.import_default_modules()") == "False"
    assert _dumpable_after("import celeryconfig") == "False"


def test_the_runyard_command_is_undumpable():
    # `runyard api` and `runyard up` both enter through cli.main.
    code = "from app import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass"
    assert _dumpable_after(code).endswith("False")


def test_a_plain_process_is_dumpable():
    assert _dumpable_after("") == "True"


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
    reason="needs root to run two processes as another user (setpriv), and a system python3",
)
def test_another_process_of_the_same_user_cannot_read_the_environment(tmp_path):
    """What a `script` agent would try: read its worker's /proc/<pid>/environ."""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3"]
    hardening_dir = str(Path(__file__).resolve().parent.parent / "app")
    holder = subprocess.Popen(
        [
            *as_nobody,
            "-c",
            f"import sys; sys.path.insert(0, {hardening_dir!r}); "
            "import hardening, time; hardening.make_undumpable(); print('ready', flush=True); "
            "time.sleep(30)",
        ],
        env={"SECRET": "hunter2", "PATH": os.environ["PATH"]},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        reader = subprocess.run(
            [*as_nobody, "-c", f"open('/proc/{holder.pid}/environ', 'rb').read()"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert reader.returncode != 0 and "PermissionError" in reader.stderr
    finally:
        holder.kill()
        holder.wait()
