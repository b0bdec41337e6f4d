"""The sweeper on RabbitMQ: a marker queue notices a broker that lost its data, and the same
recovery as on Redis publishes every queued row again; the lock lives in REDIS_URL's Redis.

The agent routes to a queue no worker serves; the tests take its messages out to read them.
"""

import uuid

import pytest
import redis
from sqlalchemy import text

from app.broker import LOCK_KEY, MARKER_QUEUE, BrokerWatch, celery_app
from app.config import current_config
from app.db import db
from app.executions import dispatch, recovery
from app.executions.versions import specs
from tests.brokers import on_rabbitmq
from tests.workers.test_sweeper import (  # noqa: F401 (agent_id: a fixture)
    QUEUE,
    agent_id,
    insert_queued,
    sweeps_at_once,
)

pytestmark = [
    pytest.mark.worker,
    pytest.mark.skipif(not on_rabbitmq(), reason="RabbitMQ's sweeper: `make test-rabbitmq`"),
]


def take_messages(queue: str) -> list[uuid.UUID]:
    """Execution ids of the messages waiting in `queue`, taken out of it."""
    import amqp

    ids = []
    with celery_app.connection_for_write() as connection:
        channel = connection.channel()
        try:
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                ids.append(uuid.UUID(message.headers["id"]))
        except amqp.exceptions.NotFound:
            pass
    return ids


def delete_queue(name: str) -> None:
    with celery_app.connection_for_write() as connection:
        connection.channel().queue_delete(name)


@pytest.fixture
def settled():
    """A first sweep: the marker queue holds its message, any recovery it opened is done."""
    recovery.sweep()
    take_messages(QUEUE)


def test_rabbitmq_is_watched_with_its_lock_in_redis_url():
    cfg = current_config()
    watch = BrokerWatch.for_broker(cfg.broker_url, cfg.redis_url)
    assert watch is not None and watch.amqp_marker and not watch.reads_messages
    assert watch.client.connection_pool.connection_kwargs["db"] == int(
        cfg.redis_url.rsplit("/", 1)[1]
    )


def test_a_rabbitmq_that_lost_its_data_gets_every_queued_row_again(agent_id, settled):  # noqa: F811
    ids = insert_queued(agent_id, recovery.SWEEP_BATCH + 10, dispatched=True)
    quiet = recovery.sweep()
    assert quiet.broker_reset is None and quiet.recovered == 0
    assert take_messages(QUEUE) == [], "dispatched rows are left alone while the marker is there"

    # What a node reset does to the queue that matters here (the vhost is shared by the run).
    delete_queue(MARKER_QUEUE)
    report = recovery.sweep()
    assert report.broker_reset and "lost its data" in report.broker_reset
    assert report.recovered >= len(ids) and report.restored == 0 and report.vanished == 0
    assert sorted(take_messages(QUEUE)) == sorted(ids)

    after = recovery.sweep()
    assert after.broker_reset is None and after.recovered == 0, "one recovery per loss"


def test_an_emptied_marker_queue_opens_a_recovery_too(agent_id, settled):  # noqa: F811
    ids = insert_queued(agent_id, 3, dispatched=True)
    with celery_app.connection_for_write() as connection:
        connection.channel().queue_purge(MARKER_QUEUE)
    report = recovery.sweep()
    assert report.broker_reset and set(ids) <= set(take_messages(QUEUE))
    assert recovery.sweep().broker_reset is None


def test_two_sweeps_at_once_recover_once_on_rabbitmq(agent_id, settled):  # noqa: F811
    ids = insert_queued(agent_id, 50, dispatched=True)
    delete_queue(MARKER_QUEUE)
    reports = sweeps_at_once(2)
    assert sum(1 for report in reports if report.broker_reset) == 1, reports
    assert sorted(take_messages(QUEUE)) == sorted(ids)


def test_a_sweep_that_finds_the_lock_held_in_redis_publishes_nothing(agent_id, settled):  # noqa: F811
    insert_queued(agent_id, 4, dispatched=False)
    delete_queue(MARKER_QUEUE)
    lock = redis.Redis.from_url(current_config().redis_url).lock(LOCK_KEY, timeout=30)
    assert lock.acquire(blocking=False)
    try:
        report = recovery.sweep()
    finally:
        lock.release()
    assert report.skipped and report.republished == 0 and report.broker_reset is None
    assert take_messages(QUEUE) == []
    assert recovery.sweep().broker_reset


def test_queued_rows_whose_message_vanished_are_published_again_on_rabbitmq(
    agent_id,  # noqa: F811
    settled,
):
    """Rows stamped when a gate let them out, whose publisher died (or met the broker down)
    before publishing: queued and stamped long ago, no message. The messages waiting in the
    queue are read and given back; a retry (attempt 1) is left alone, its countdown message
    possibly held by a live worker where it cannot be read; a resumed durable run (attempt 1,
    `resuming`, whose wake-up's publish was lost) is published again."""
    ids = insert_queued(agent_id, 7, dispatched=True)
    resumed, retry = ids[-2], ids[-1]
    with db.hot() as conn:
        conn.execute(
            text(
                "UPDATE executions SET dispatched_at = now() - interval '5 minutes', "
                "attempt = CASE WHEN id IN (:retry, :resumed) THEN 1 ELSE 0 END, "
                "resuming = (id = :resumed) WHERE id = ANY(:ids)"
            ),
            {"ids": ids, "retry": retry, "resumed": resumed},
        )
        version_id = conn.execute(
            text("SELECT version_id FROM executions WHERE id = :id"), {"id": ids[0]}
        ).scalar()
        spec = specs.get(conn, version_id)
    waiting = ids[:2]
    dispatch.publish_many([dispatch.Dispatch(execution_id, spec, 5) for execution_id in waiting])
    report = recovery.sweep()
    assert report.vanished == 4, report
    assert recovery.sweep().vanished == 0, "found in the queue now, given back by the read"
    assert sorted(take_messages(QUEUE)) == sorted(ids[:-1]), "each row's message once"
