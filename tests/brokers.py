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
