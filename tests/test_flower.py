"""Flower is never open: `runyard up` and docker-compose start it behind basic auth."""

from __future__ import annotations

import base64
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from app.embedded import free_port
from app.up import Supervisor, flower_command

ROOT = Path(__file__).resolve().parent.parent


def _status(url: str, credentials: str | None = None) -> int:
    request = urllib.request.Request(url)
    if credentials:
        request.add_header(
            "Authorization", "Basic " + base64.b64encode(credentials.encode()).decode()
        )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


PASSWORD = "s3cret-test"


@pytest.fixture
def flower(app, tmp_path):
    """Flower started as `runyard up` starts it (its Supervisor): (base URL, process)."""
    port = free_port()
    supervisor = Supervisor(tmp_path, {**os.environ, "PYTHONPATH": str(ROOT)})
    argv, env = flower_command(port, "runyard", PASSWORD)
    supervisor.start("flower", argv, env)
    [child] = supervisor.children
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthcheck", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # it answers: up
            except OSError:
                if child.process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"flower did not start:\n{child.log_path.read_text()[-3000:]}")
                time.sleep(0.2)
        yield base, child.process
    finally:
        os.killpg(child.process.pid, signal.SIGTERM)
        child.process.wait(timeout=15)


def test_flower_pages_and_api_need_the_password(flower):
    flower, _process = flower
    for path in ("/", "/workers", "/tasks", "/api/workers", "/api/tasks"):
        assert _status(flower + path) == 401, path
        assert _status(flower + path, "runyard:wrong") == 401, path
    assert _status(flower + "/", f"runyard:{PASSWORD}") == 200
    assert _status(flower + "/api/tasks", f"runyard:{PASSWORD}") == 200


def test_the_password_is_not_on_flowers_command_line(flower):
    """Any local user reads /proc/<pid>/cmdline (`ps`); the environment only its own user."""
    _base, process = flower
    command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    assert b"flower" in command_line
    assert PASSWORD.encode() not in command_line
    assert f"FLOWER_BASIC_AUTH=runyard:{PASSWORD}".encode() in (
        Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
    )


def test_flower_refuses_to_start_without_a_password():
    with pytest.raises(ValueError, match="RUNYARD_FLOWER_PASSWORD"):
        flower_command(5555, "runyard", "")
    with pytest.raises(ValueError, match="comma"):
        flower_command(5555, "runyard", "a,b")


def test_compose_runs_flower_behind_auth_on_loopback():
    compose = (ROOT / "docker-compose.yml").read_text()
    flower = compose[compose.index("\n  flower:") :]
    flower = flower[: flower.index("\nvolumes:")]
    # `:?` makes every compose command fail when the password is unset, never start Flower open.
    assert re.search(
        r"FLOWER_BASIC_AUTH: \$\{RUNYARD_FLOWER_USER:-\w+\}:\$\{RUNYARD_FLOWER_PASSWORD:\?",
        flower,
    )
    assert "--basic-auth" not in flower  # never on the command line: `ps` shows it
    assert '"127.0.0.1:5555:5555"' in flower
