"""The submit rate is one budget per organization over every API process: two real `runyard api`
servers (gunicorn) share it."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from app.db import db
from app.embedded import free_port
from app.flow import services as flow
from tests.app.test_executions_api import ECHO
from tests.conftest import ROOT

RUNYARD = str(Path(sys.executable).parent / "runyard")


def _call(base: str, path: str, body: dict | None, headers: dict) -> int:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, headers={**headers, "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@contextlib.contextmanager
def api_server(log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real `runyard api` (one gunicorn worker); `env` adds to the test environment."""
    port = free_port()
    env = {**os.environ, "RUNYARD_API_WORKERS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [RUNYARD, "api", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while _reachable(base) is False:
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)


def _reachable(base: str) -> bool:
    try:
        return _call(base, "/healthz", None, {}) == 200
    except OSError:
        return False


def test_the_submit_rate_is_one_budget_over_two_api_processes(live_org, tmp_path):
    with db.session() as session:
        flow.set_limits(session, live_org.name, {"submit_rate": 0.05, "submit_burst": 4})
        session.commit()
    with api_server(tmp_path / "api-1.log") as first, api_server(tmp_path / "api-2.log") as second:
        assert _call(first, "/api/v1/agents", ECHO, live_org.headers) == 201
        submit = "/api/v1/agents/echo/executions"
        answers = [
            (server, _call(server, submit, {"input": {"text": "x"}}, live_org.headers))
            for server in [first, second] * 5
        ]
    accepted = [server for server, status in answers if status == 202]
    refused = [status for _, status in answers if status != 202]
    # One token every 20 s: the burst of 4, and no more, over both servers together.
    assert len(accepted) == 4 and set(refused) == {429}, answers
    assert set(accepted) == {first, second}, "each server took some: one budget, not two"
