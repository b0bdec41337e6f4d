"""Publishing on RabbitMQ: a batch is in its queue, confirmed, when the bulk publish returns, and
a queue declared before without priorities is refused with what to do, never silently."""

import uuid

import amqp
import pytest

from app import broker
from app.broker import QueueMismatch, RunMessage, celery_app
from tests.brokers import on_rabbitmq, queue_depth

pytestmark = pytest.mark.skipif(not on_rabbitmq(), reason="RabbitMQ only: `make test-rabbitmq`")


def messages(queue: str, count: int, priority: int = 5) -> list[RunMessage]:
    return [
        RunMessage(uuid.uuid4(), queue, priority, 60.0, 70.0, "noop", "1.0.0", "test")
        for _ in range(count)
    ]


@pytest.fixture
def queue():
    name = f"publish-{uuid.uuid4().hex[:8]}"
    yield name
    with celery_app.connection_for_write() as connection:
        connection.channel().queue_delete(name)


def test_a_bulk_publish_returns_once_every_message_is_in_its_queue(queue):
    broker.send_runs_in_bulk(messages(queue, 1000) + messages(queue, 500, priority=9))
    # No wait: the confirms came back before the call returned.
    assert queue_depth(queue) == 1500


def test_the_most_urgent_message_is_served_first(queue):
    low, urgent = messages(queue, 3, priority=0), messages(queue, 1, priority=9)
    broker.send_runs_in_bulk(low + urgent)
    with celery_app.connection_for_write() as connection:
        first = connection.channel().basic_get(queue, no_ack=True)
    assert first.headers["id"] == str(urgent[0].execution_id)


def test_a_queue_declared_without_priorities_is_refused_with_what_to_do(queue):
    with celery_app.connection_for_write() as connection:
        connection.channel().queue_declare(queue, durable=True, auto_delete=False)
    for publish in (
        lambda: broker.send_runs_in_bulk(messages(queue, 2)),
        lambda: broker.send_run(messages(queue, 1)[0]),
    ):
        with pytest.raises(QueueMismatch) as refused:
            publish()
        assert isinstance(refused.value.__cause__, amqp.exceptions.PreconditionFailed)
        assert "PRECONDITION_FAILED" in str(refused.value)
        assert "rabbitmqctl delete_queue" in str(refused.value)
    assert queue_depth(queue) == 0


def test_a_queue_deleted_under_the_publisher_refuses_then_is_declared_again(queue):
    """The confirm channel remembers what it declared; a queue deleted meanwhile (by hand, or a
    broker that lost its data) returns the mandatory message: the publish raises (its rows stay
    the sweeper's) and the next one declares the queue again."""
    broker.send_runs_in_bulk(messages(queue, 1))
    with celery_app.connection_for_write() as connection:
        connection.channel().queue_delete(queue)
    with pytest.raises(RuntimeError, match="no queue took"):
        broker.send_runs_in_bulk(messages(queue, 1))
    broker.send_runs_in_bulk(messages(queue, 2))
    assert queue_depth(queue) == 2
