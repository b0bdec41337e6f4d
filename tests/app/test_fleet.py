"""GET /api/v1/workers: live workers from Celery's remote control, with real worker processes."""

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text

from app.fleet.services import FleetCache, Worker, workers_from
from tests.conftest import ROOT, RUN_ID, bearer, make_token, wait_for, wait_until


def test_replies_become_workers():
    now = dt.datetime.now(dt.UTC)
    replies = {
        "active_queues": {"a@h": [{"name": "default"}, {"name": "bulk"}], "b@h": []},
        "stats": {"a@h": {"pool": {"max-concurrency": 4}}},
        "active": {
            # As Celery answers: "name" is the shadow name a message carries, "type" the task.
            "a@h": [
                {"name": "run sum@1.0.0", "type": "runyard.run_execution"},
                {"name": "celery.chord_unlock", "type": "celery.chord_unlock"},
            ],
            "c@h": [],
        },
    }
    workers = workers_from(replies, {"a@h": now})
    assert workers[0] == Worker("a@h", ["bulk", "default"], 4, 1, now)
    # A worker that answered only some questions is listed with what is known.
    assert [(w.name, w.queues, w.concurrency, w.active_executions) for w in workers[1:]] == [
        ("b@h", [], None, 0),
        ("c@h", [], None, 0),
    ]


def test_the_cache_asks_once_per_period_and_serves_stale_during_a_refresh():
    calls = []
    release = threading.Event()

    def fetch():
        calls.append(time.monotonic())
        if len(calls) == 2:
            release.wait(5)
        return {"stats": {f"w{len(calls)}@h": {}}}, {}

    cache = FleetCache(fetch, seconds=0.2)
    assert [w.name for w in cache.workers()] == ["w1@h"]
    assert [w.name for w in cache.workers()] == ["w1@h"] and len(calls) == 1
    time.sleep(0.25)
    refresher = threading.Thread(target=cache.workers)
    refresher.start()
    wait_until(lambda: len(calls) == 2)
    # Another caller does not wait on the refresh: it gets the previous snapshot.
    started = time.monotonic()
    assert [w.name for w in cache.workers()] == ["w1@h"]
    assert time.monotonic() - started < 0.1 and len(calls) == 2
    release.set()
    refresher.join(5)
    assert [w.name for w in cache.workers()] == ["w2@h"]


@contextmanager
def extra_worker(queue: str, name: str, tmp_path: Path):
    """A second worker process on another queue, terminated at the end."""
    log_path = tmp_path / f"{queue}.log"
    celery = Path(sys.executable).parent / "celery"
    command = [str(celery), "-A", "workers", "worker", "-P", "prefork", "-c", "1", "-Q", queue]
    command += ["--without-gossip", "--without-mingle", "-l", "INFO", "-n", name]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while b" ready." not in log_path.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def listing(client, headers):
    response = client.get("/api/v1/workers?page_size=100", headers=headers)
    assert response.status_code == 200, response.get_json()
    return {worker["name"]: worker for worker in response.get_json()}


@pytest.mark.worker
def test_workers_are_listed_and_an_agent_queue_routes_to_its_worker(
    live_client, live_org, tmp_path
):
    import socket

    host = socket.gethostname()
    main_name = f"test-{RUN_ID}@{host}"
    special_name = f"special-{RUN_ID}-{uuid.uuid4().hex[:6]}@{host}"
    viewer = bearer(make_token(live_org, "viewer"))
    with extra_worker("special", special_name, tmp_path) as process:
        workers = wait_until(
            lambda: (
                (found := listing(live_client, viewer)).keys() >= {main_name, special_name}
                and found
            ),
            timeout=10,
        )
        main, special = workers[main_name], workers[special_name]
        assert main["queues"] == ["default"] and main["concurrency"] == 2
        assert special["queues"] == ["special"] and special["concurrency"] == 1
        assert special["active_executions"] == 0
        age = dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(special["last_heartbeat"])
        assert age < dt.timedelta(seconds=10)

        response = live_client.post(
            "/api/v1/agents",
            json={
                "name": "special-sleepy",
                "runtime": {"type": "python", "entrypoint": "tests.agents:sleepy"},
                "queue": "special",
            },
            headers=live_org.headers,
        )
        assert response.status_code == 201, response.get_json()
        response = live_client.post(
            "/api/v1/agents/special-sleepy/executions",
            json={"input": {"seconds": 6}},
            headers=live_org.headers,
        )
        execution_id = response.get_json()["id"]
        busy = wait_until(
            lambda: listing(live_client, viewer)[special_name]["active_executions"] == 1,
            timeout=6,
        )
        assert busy
        result = wait_for(live_client, live_org, execution_id, timeout=20)
        assert result["status"] == "succeeded", result
        from app.db import db

        with db.engine.connect() as conn:
            worker = conn.scalar(
                text("SELECT worker FROM executions WHERE id = :id"), {"id": execution_id}
            )
        assert worker == special_name

        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    # A stopped worker no longer answers, so it leaves the listing within a cache period.
    wait_until(lambda: special_name not in listing(live_client, viewer), timeout=10)
    assert main_name in listing(live_client, viewer)


def test_workers_need_a_token(client):
    response = client.get("/api/v1/workers")
    assert response.status_code == 401
