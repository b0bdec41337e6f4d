"""The client and the CLI against a real `runyard api` (gunicorn on a free port) served by a real
Celery worker, in a committed organization of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.app.test_events_live import api  # noqa: F401 (the live `runyard api` fixture)
from tests.conftest import ROOT

RUNYARD = Path(sys.executable).parent / "runyard"


@pytest.fixture
def base_url(api) -> str:  # noqa: F811
    host, port = api
    return f"http://{host}:{port}"


@pytest.fixture
def runyard(base_url, live_org):
    from runyard_client import Runyard

    with Runyard(base_url, live_org.token) as client:
        yield client


@pytest.fixture
def cli(base_url, live_org, tmp_path):
    """`runyard ARGS...` as a person types it: a subprocess, pointed at the server by
    RUNYARD_URL / RUNYARD_TOKEN, with a HOME of its own."""

    def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None):
        environment = {
            **os.environ,
            "HOME": str(tmp_path),
            "RUNYARD_URL": base_url,
            "RUNYARD_TOKEN": live_org.token,
            "PYTHONPATH": str(ROOT),
            "COLUMNS": "160",
            **(env or {}),
        }
        environment.pop("XDG_CONFIG_HOME", None)
        return subprocess.run(
            [str(RUNYARD), *args],
            env={k: v for k, v in environment.items() if v is not None},
            cwd=ROOT,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run
