"""Test fixtures on real servers.

pytest_configure picks the servers before anything imports Celery's config: DATABASE_URL and
REDIS_URL when set (CI points them at the machine's services), else embedded PostgreSQL and Redis
under .runyard/. Each run gets a database of its own, built by `alembic upgrade head`, and a Redis
database number of its own.

Two kinds of test:
- `client` tests run inside one transaction per test, rolled back at the end (savepoints absorb
  the code's own commits). No worker can see their rows.
- `live_client` tests commit for real, in an organization of their own that is deleted after, and
  are served by a real Celery worker (a subprocess with a prefork pool) started once per session.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.brokers import add_vhost, delete_vhost, ensure_rabbitmq_running
from tests.hosts.netns import celery_worker_argv

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = f"{os.getpid()}"
TEST_AGENT_MODULES = "runyard_examples,tests.agents"
TEST_ALLOWED_COMMANDS = "python3,sh"
TEST_SECRET_KEY = base64.b64encode(os.urandom(32)).decode()

_embedded: list = []


def _fresh_database(server_url: str, name: str) -> str:
    url = make_url(server_url).set(drivername="postgresql+psycopg")
    admin = url.set(drivername="postgresql", database="postgres")
    dsn = admin.render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


def _drop_database(database_url: str) -> None:
    url = make_url(database_url)
    dsn = url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )
    with contextlib.suppress(psycopg.Error), psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')


def pytest_configure(config: pytest.Config) -> None:
    from app import config as app_config
    from app.embedded import EmbeddedPostgres, EmbeddedRedis

    # A conftest under tests/ named on the command line loads before this hook. Had it imported
    # the Celery app or read the settings, they would keep the environment's servers while the
    # workers get the run's own (tests/hostile/test_worker.py published where none listened).
    if "celeryconfig" in sys.modules or app_config._current is not None:
        raise pytest.UsageError(
            "a conftest read Runyard's settings or imported the Celery app at its import, "
            "before pytest_configure picked this run's servers: import app.broker, "
            "app.wallets and the like inside the fixtures and functions that use them"
        )

    server_url = os.environ.get("DATABASE_URL")
    if server_url:
        database_url = _fresh_database(server_url, f"runyard_test_{RUN_ID}")
    else:
        postgres = EmbeddedPostgres(ROOT / ".runyard" / "test-pgdata", database="postgres")
        _embedded.append(postgres)
        database_url = _fresh_database(postgres.start(), f"runyard_test_{RUN_ID}")
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        redis = EmbeddedRedis(ROOT / ".runyard" / "test-redis")
        _embedded.append(redis)
        redis_url = redis.start()
    redis_url = _claim_redis_database(redis_url)
    broker_url = os.environ.get("RUNYARD_BROKER_URL")
    if broker_url and broker_url.startswith("amqp://"):
        # RabbitMQ's counterpart of the Redis database number: a vhost of this run's own.
        vhost = f"runyard_test_{RUN_ID}"
        os.environ["RUNYARD_BROKER_URL"] = add_vhost(broker_url, vhost)
        _claimed_vhosts.append(vhost)
    os.environ.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "RUNYARD_AGENT_MODULES": TEST_AGENT_MODULES,
            "RUNYARD_TOKEN_CACHE_SECONDS": "0",
            # Limits set by a test apply to its next request.
            "RUNYARD_LIMITS_CACHE_SECONDS": "0",
            "RUNYARD_LOG_FLUSH_SECONDS": "0.2",
            "RUNYARD_ALLOWED_COMMANDS": TEST_ALLOWED_COMMANDS,
            # Short graces and a small process cap keep the limit and cancel tests quick.
            "RUNYARD_KILL_GRACE_SECONDS": "1",
            "RUNYARD_PYTHON_CANCEL_GRACE_SECONDS": "1",
            "RUNYARD_CHILD_MAX_PROCESSES": "16",
            "RUNYARD_CHILD_MAX_FILE_MB": "8",
            # http agents in tests call a server on 127.0.0.1; other loopback names stay refused.
            "RUNYARD_HTTP_ALLOW_HOSTS": "127.0.0.1,127.0.0.2",
            # Secrets, webhook and notification secrets are sealed under it (a fresh one per run).
            "RUNYARD_SECRET_KEYS": TEST_SECRET_KEY,
        }
    )
    from app.migrate import upgrade

    upgrade(database_url)
    config.stash[DATABASE_KEY] = database_url


def make_url_with_db(redis_url: str, number: int) -> str:
    return urlunsplit(urlsplit(redis_url)._replace(path=f"/{number}"))


REDIS_CLAIM_KEY = "runyard:test-run"


def _claim_redis_database(redis_url: str) -> str:
    """A Redis database number of this run's own (1..15), so parallel runs never share queues.

    The claim is a key set with NX and an expiry, so a crashed run frees its number within an hour.
    """
    import redis as redis_client

    for offset in range(15):
        url = make_url_with_db(redis_url, 1 + (int(RUN_ID) + offset) % 15)
        client = redis_client.Redis.from_url(url)
        if client.set(REDIS_CLAIM_KEY, RUN_ID, nx=True, ex=3600):
            client.flushdb()
            client.set(REDIS_CLAIM_KEY, RUN_ID, ex=3600)
            _claimed_redis.append(url)
            return url
    raise pytest.UsageError("every Redis database 1..15 is claimed by another test run")


_claimed_redis: list[str] = []


_claimed_vhosts: list[str] = []


def pytest_unconfigure(config: pytest.Config) -> None:
    from app.db import db
    from app.executions import events

    events.hub.stop()  # its listener would reconnect, and warn, once the database is dropped
    db.dispose()
    database_url = config.stash.get(DATABASE_KEY, None)
    if database_url:
        _drop_database(database_url)
    for url in _claimed_redis:
        import redis as redis_client

        with contextlib.suppress(redis_client.RedisError):
            client = redis_client.Redis.from_url(url)
            client.flushdb()
    if _claimed_vhosts:
        # A broker fault test that failed between stop_app and start_app: the machine's
        # RabbitMQ is left running whatever happened.
        ensure_rabbitmq_running()
    for vhost in _claimed_vhosts:
        delete_vhost(vhost)
    for server in reversed(_embedded):
        server.stop()


DATABASE_KEY = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def database_url(pytestconfig) -> str:
    return pytestconfig.stash[DATABASE_KEY]


@pytest.fixture(scope="session")
def app(database_url):
    from app import create_app
    from app.config import Config

    return create_app(Config.from_env())


@pytest.fixture
def connection(app) -> Iterator:
    """One connection, one outer transaction per test, rolled back at the end."""
    from app.db import db

    conn = db.engine.connect()
    outer = conn.begin()
    with db.bind_for_tests(conn):
        yield conn
    outer.rollback()
    conn.close()


@dataclass
class Org:
    id: uuid.UUID
    name: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _new_org(prefix: str) -> Org:
    from app.db import db
    from app.orgs import services

    with db.session() as session:
        org, token = services.create_org(session, f"{prefix}-{uuid.uuid4().hex[:10]}")
        session.commit()
    return Org(org.id, org.name, token)


@pytest.fixture
def client(app, connection):
    return app.test_client()


@pytest.fixture
def org(connection) -> Org:
    return _new_org("org")


@pytest.fixture
def other_org(connection) -> Org:
    return _new_org("other")


def make_token(org: Org, role: str, **kwargs) -> str:
    from app.db import db
    from app.orgs import services

    with db.session() as session:
        token = services.create_token(session, org.id, name=role, role=role, **kwargs)
        session.commit()
    return token


# ---------------------------------------------------------------------------------------------
# Live: real commits and a real worker


@contextlib.contextmanager
def celery_worker(
    log_path: Path,
    queues: str = "default",
    concurrency: int = 2,
    name: str = "test",
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """A real Celery worker subprocess (prefork), ready when this yields; stopped (warm, then
    killed with its whole group) when the block ends. `env` overrides the test environment
    (another broker or database, shorter leases)."""
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            celery_worker_argv("workers", queues, concurrency, f"{name}-{RUN_ID}@%h"),
            cwd=ROOT,
            # tests.agents must be importable in the pool processes.
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
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
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # Pool processes and anything an agent left behind share the worker's session.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def worker(app, tmp_path_factory) -> Iterator[Path]:
    """A Celery worker subprocess (prefork, 2 processes) serving the `default` queue."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with celery_worker(log_path):
        yield log_path


def own_queue(prefix: str) -> str:
    """A queue name of this run's own: no other worker of the session serves it."""
    return f"{prefix}-{RUN_ID}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def unserved_queue(prefix: str) -> Iterator[str]:
    """The name of a broker queue no worker of the suite serves, deleted at the end with the
    messages left in it. Committed executions meant to stay queued go there: on `default`,
    the session's worker would claim them."""
    from app.broker import celery_app

    name = own_queue(prefix)
    try:
        yield name
    finally:
        # The queue as Celery made it when it first published there, declared again: kombu's
        # Redis channel deletes only the bindings it knows, and a new connection knows none.
        queue = celery_app.amqp.queues[name]
        with celery_app.connection_for_write() as connection:
            bound = queue.bind(connection.default_channel)
            bound.declare()
            bound.delete()


@contextlib.contextmanager
def _committed_org(prefix: str) -> Iterator[Org]:
    from app.db import db

    org = _new_org(prefix)
    yield org
    with db.engine.begin() as conn:
        conn.execute(text("DELETE FROM organizations WHERE id = :id"), {"id": org.id})


@pytest.fixture
def live_org(app) -> Iterator[Org]:
    with _committed_org("live") as org:
        yield org


@pytest.fixture
def other_live_org(app) -> Iterator[Org]:
    with _committed_org("other-live") as org:
        yield org


@pytest.fixture
def live_client(app, worker):
    return app.test_client()


def wait_for(client, org: Org, execution_id: str, timeout: float = 20.0) -> dict:
    """Poll an execution until it reaches a terminal status."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/api/v1/executions/{execution_id}", headers=org.headers).get_json()
        if body["status"] in ("succeeded", "failed", "timed_out", "cancelled"):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"execution still {body['status']} after {timeout}s: {body}")
        time.sleep(0.05)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def an_execution_update_waits_on_a_row_lock() -> bool:
    """Whether a session of the test database is blocked on a row lock in an UPDATE of
    executions (for tests that hold a row and make another request wait on it)."""
    from app.db import db

    with db.hot() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE '%UPDATE executions%'"
                )
            ).scalar()
        )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
