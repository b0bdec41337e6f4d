"""A private Runyard for the storage fault tests: its own PostgreSQL and Redis, which the tests
stop, restart and flush, with an API, a worker and a beat (running the sweeper every second)
pointed at them. The shared test servers are never touched, but for RabbitMQ: when the run's
broker is RabbitMQ (`make test-rabbitmq`), the stack's broker is a vhost of its own on the
machine's RabbitMQ (its Redis still holds the result backend and the sweepers' lock), and
stopping the broker stops the machine's RabbitMQ application, started again in a `finally`.

Each test module opens one stack (`private_stack`) for its tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from app.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from app.migrate import upgrade
from tests import brokers
from tests.beat import BeatProcess
from tests.conftest import ROOT, RUN_ID, celery_worker
from tests.faults.harness import LEDGER_AGENT, install_audit, psycopg_dsn

# Short enough that every recovery in these tests is quick, long enough to be realistic.
STACK_SETTINGS = {
    "RUNYARD_SWEEP_INTERVAL_SECONDS": "1",
    "RUNYARD_DISPATCH_GRACE_SECONDS": "1",
    "RUNYARD_CHAIN_STALL_SECONDS": "5",
    "RUNYARD_API_WORKERS": "1",
    "RUNYARD_API_THREADS": "8",
}
WORKER_CONCURRENCY = 3


@dataclass
class Reply:
    status: int
    body: dict | list | None
    seconds: float


class Api:
    """A small client of the private API process (urllib: nothing but the standard library)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.token = ""

    def call(self, method: str, path: str, body: dict | None = None, timeout=30.0) -> Reply:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        return Reply(status, json.loads(raw) if raw else None, time.monotonic() - started)

    def submit(self, agent: str, payload: dict) -> Reply:
        return self.call("POST", f"/api/v1/agents/{agent}/executions", {"input": payload})


class RedisBroker:
    """The stack's own redis-server as its broker."""

    name = "redis"

    def __init__(self, server: EmbeddedRedis) -> None:
        self.server = server

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()

    def lose_data(self) -> None:
        import redis

        redis.Redis.from_url(self.server.url).flushall()


class RabbitBroker:
    """A vhost of the stack's own on the machine's RabbitMQ as its broker."""

    name = "rabbitmq"

    def __init__(self, vhost: str) -> None:
        self.vhost = vhost
        self.url = brokers.add_vhost(os.environ["RUNYARD_BROKER_URL"], vhost)

    def stop(self) -> None:
        brokers.stop_rabbitmq()

    def start(self) -> None:
        brokers.ensure_rabbitmq_running()

    def lose_data(self) -> None:
        """What a node reset does to this stack: every queue, message and binding gone."""
        brokers.add_vhost(self.url, self.vhost)

    def close(self) -> None:
        brokers.delete_vhost(self.vhost)


@dataclass
class Stack:
    directory: Path
    postgres: EmbeddedPostgres
    database_url: str
    redis: EmbeddedRedis
    api: Api
    env: dict[str, str]
    worker_log: Path
    broker: RedisBroker | RabbitBroker
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def ledger(self) -> Path:
        return self.directory / "ledger.txt"

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(psycopg_dsn(self.database_url), autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    def count(self, ids: list[uuid.UUID], condition: str) -> int:
        return self.sql(
            f"SELECT count(*) FROM executions WHERE id = ANY(%s) AND {condition}", (ids,)
        )[0][0]

    def submit_ledger(
        self, count: int, seconds: float, agent: str = "ledger", **payload
    ) -> list[uuid.UUID]:
        """`count` executions of a ledger agent through the API; the ids its 202s returned."""
        ids = []
        for n in range(count):
            reply = self.api.submit(
                agent, {"ledger": str(self.ledger), "seconds": seconds, "n": n, **payload}
            )
            assert reply.status == 202, reply.body
            ids.append(uuid.UUID(reply.body["id"]))
        return ids

    def start_postgres(self) -> None:
        assert self.postgres.start() == self.database_url, "the server came back elsewhere"

    def start_redis(self) -> None:
        self.redis.start()


def _wait_for_api(api: Api, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError):
            if api.call("GET", "/healthz", timeout=2).status == 200:
                return
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the private API did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def private_stack(
    directory: Path, name: str, settings: dict[str, str] | None = None
) -> Iterator[Stack]:
    """The stack, with `settings` over STACK_SETTINGS for every process of it."""
    # pgserver runs PostgreSQL as an unprivileged user when the tests run as root: the data
    # directory lives under the checkout (as the shared embedded one does), not in pytest's
    # owner-only temporary directory.
    pg_dir = ROOT / ".runyard" / f"faults-{name}-{os.getpid()}"
    postgres = EmbeddedPostgres(pg_dir / "pgdata")
    redis_server = EmbeddedRedis(directory / "redis", free_port())
    database_url = postgres.start()
    rabbit = RabbitBroker(f"runyard_test_{RUN_ID}_{name}") if brokers.on_rabbitmq() else None
    try:
        upgrade(database_url)
        install_audit(database_url)
        redis_url = redis_server.start()
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "RUNYARD_BROKER_URL": rabbit.url if rabbit else redis_url,
            **STACK_SETTINGS,
            **(settings or {}),
        }
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        created = subprocess.run(
            [str(Path(sys.executable).parent / "runyard"), "orgs", "create", name, "--json"],
            env=full_env,
            capture_output=True,
            check=True,
        )
        port = free_port()
        api = Api(f"http://127.0.0.1:{port}")
        api.token = json.loads(created.stdout)["token"]
        api_log = directory / "api.log"
        with open(api_log, "wb") as log_file:
            api_process = subprocess.Popen(
                [str(Path(sys.executable).parent / "runyard"), "api", "--port", str(port)],
                cwd=ROOT,
                env=full_env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_for_api(api, api_process, api_log)
            agent = api.call("POST", "/api/v1/agents", {"name": "ledger", **LEDGER_AGENT})
            assert agent.status == 201, agent.body
            worker_log = directory / "worker.log"
            beat = BeatProcess(directory, "beat", env=env)
            with celery_worker(
                worker_log, concurrency=WORKER_CONCURRENCY, name=f"private-{name}", env=env
            ):
                try:
                    beat.wait_ready()
                    yield Stack(
                        directory,
                        postgres,
                        database_url,
                        redis_server,
                        api,
                        env,
                        worker_log,
                        rabbit or RedisBroker(redis_server),
                    )
                finally:
                    beat.stop()
        finally:
            _stop(api_process)
    finally:
        if rabbit:
            brokers.ensure_rabbitmq_running()
            rabbit.close()
        redis_server.stop()
        postgres.stop()
        shutil.rmtree(pg_dir, ignore_errors=True)


def wait_until_healthy(stack: Stack, timeout: float = 30.0) -> None:
    """After a test restarted a server: the stack takes a submit and runs it again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if stack.api.call("GET", "/readyz", timeout=5).status == 200:
                return
        time.sleep(0.2)
    pytest.fail("the private stack did not become ready again")
