"""Flower is never open: `runyard up` and docker-compose start it behind basic auth."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from app.embedded import free_port
from app.up import flower_command

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


@pytest.fixture
def flower(app, tmp_path):
    port = free_port()
    log_path = tmp_path / "flower.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            flower_command(port, "runyard", "s3cret-test"),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
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
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"flower did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)


def test_flower_pages_and_api_need_the_password(flower):
    for path in ("/", "/workers", "/tasks", "/api/workers", "/api/tasks"):
        assert _status(flower + path) == 401, path
        assert _status(flower + path, "runyard:wrong") == 401, path
    assert _status(flower + "/", "runyard:s3cret-test") == 200
    assert _status(flower + "/api/tasks", "runyard:s3cret-test") == 200


def test_flower_refuses_to_start_without_a_password():
    with pytest.raises(ValueError, match="RUNYARD_FLOWER_PASSWORD"):
        flower_command(5555, "runyard", "")


def test_compose_runs_flower_behind_auth_on_loopback():
    compose = (ROOT / "docker-compose.yml").read_text()
    flower = compose[compose.index("\n  flower:") :]
    flower = flower[: flower.index("\nvolumes:")]
    # `:?` makes every compose command fail when the password is unset, never start Flower open.
    assert re.search(
        r"--basic-auth=\$\{RUNYARD_FLOWER_USER:-\w+\}:\$\{RUNYARD_FLOWER_PASSWORD:\?", flower
    )
    assert '"127.0.0.1:5555:5555"' in flower
