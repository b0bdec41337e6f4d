"""What tests need to know of the broker they run on: Redis (the default) or RabbitMQ (`make
test-rabbitmq` points RUNYARD_BROKER_URL at a vhost of the run's own, tests/conftest.py)."""

from __future__ import annotations

import os

import pytest


def on_rabbitmq() -> bool:
    return os.environ.get("RUNYARD_BROKER_URL", "").startswith("amqp://")


# For tests that read or write kombu's Redis keys, or stop the test's own redis-server as the
# broker: the behaviour they check is Redis's own (on RabbitMQ its counterpart is tested apart).
redis_broker_only = pytest.mark.skipif(
    "os.environ.get('RUNYARD_BROKER_URL', '').startswith('amqp://')",
    reason="reads kombu's Redis keys or restarts the broker's Redis: the broker is RabbitMQ",
)


def queue_depth(queue: str) -> int:
    """Messages waiting in `queue` (not those taken by a worker), on either broker."""
    if on_rabbitmq():
        import amqp

        from app.broker import celery_app

        with celery_app.connection_for_write() as connection:
            channel = connection.channel()
            try:
                return channel.queue_declare(queue, passive=True)[1]
            except amqp.exceptions.NotFound:
                return 0
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    return sum(client.llen(key) for key in client.keys(f"{queue}*"))


# ---------------------------------------------------------------------------------------------
# The machine's RabbitMQ (root: `rabbitmqctl` works)


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    import subprocess

    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def add_vhost(broker_url: str, vhost: str) -> str:
    """A fresh vhost (one a crashed run left is deleted first) on which the URL's user may do
    everything; the broker URL pointing at it. Deleting it deletes its queues and messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(broker_url)
    delete_vhost(vhost)
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, parts.username or "guest", ".*", ".*", ".*")
    return urlunsplit(parts._replace(path=f"/{vhost}"))


def delete_vhost(vhost: str) -> None:
    import contextlib

    with contextlib.suppress(RuntimeError):
        rabbitmqctl("delete_vhost", vhost)


def stop_rabbitmq() -> None:
    """The broker down: the node stays, its RabbitMQ application stops (every vhost)."""
    rabbitmqctl("stop_app")


def ensure_rabbitmq_running() -> None:
    """Start RabbitMQ's application (a no-op when it runs) and wait until it serves."""
    rabbitmqctl("start_app", timeout=120)
    rabbitmqctl("await_startup", timeout=120)
