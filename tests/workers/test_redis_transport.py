"""The worker's Redis transport (workers/redis_transport.py): an acknowledgement leaves kombu's
`unacked` hash with the next delivery's round trip, the event loop's flush or the channel's
close, and at once where no event loop runs. Real Redis, kombu's own consuming calls."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Queue
from kombu.asynchronous import Hub

from app.config import current_config
from tests.brokers import redis_broker_only
from tests.conftest import own_queue, wait_for
from workers import redis_transport

pytestmark = [redis_broker_only]


@pytest.fixture
def queue() -> Iterator[str]:
    name = own_queue("transport")
    yield name
    client = redis.Redis.from_url(current_config().broker_url)
    client.delete(*client.keys(f"{name}*") or ["-"], f"_kombu.binding.{name}")


@pytest.fixture
def connection(queue) -> Iterator[Connection]:
    with Connection(
        current_config().broker_url, transport="workers.redis_transport:Transport"
    ) as conn:
        yield conn


def held(tags: list[str]) -> list[str]:
    """Which of `tags` kombu's `unacked` hash and its index still hold (both must agree)."""
    client = redis.Redis.from_url(current_config().broker_url)
    in_hash = [tag for tag, raw in zip(tags, client.hmget("unacked", tags), strict=True) if raw]
    in_index = [tag for tag in tags if client.zscore("unacked_index", tag) is not None]
    assert in_hash == in_index, "the hash and its index disagree"
    return in_hash


def take(connection: Connection, queue: str, count: int) -> list:
    """`count` messages published to `queue`, then taken as a worker's consumer takes them:
    each recorded in `unacked` until acknowledged."""
    Queue(queue, channel=connection.default_channel).declare()
    with connection.Producer() as producer:
        for n in range(count):
            producer.publish({"n": n}, routing_key=queue, serializer="json")
    messages = [connection.default_channel.basic_get(queue) for _ in range(count)]
    assert all(messages), "every message published was taken"
    # In an event loop the records go without waiting for Redis's reply: wait for it here.
    connection.default_channel.qos.settle()
    return messages


def test_without_an_event_loop_an_ack_is_written_at_once(connection, queue):
    """The API, beat or a worker without an event loop: nothing would flush a pending ack."""
    first, second = take(connection, queue, 2)
    tags = [first.delivery_tag, second.delivery_tag]
    assert held(tags) == tags
    first.ack()
    assert held(tags) == [second.delivery_tag]


def test_in_an_event_loop_an_ack_rides_with_the_next_delivery_or_the_flush(connection, queue):
    hub = Hub()
    try:
        connection.transport.register_with_event_loop(connection.connection, hub)
        first, second = take(connection, queue, 2)
        first.ack()
        assert held([first.delivery_tag]) == [first.delivery_tag], "not written yet"
        assert connection.default_channel.qos.can_consume(), "its prefetch slot is free at once"

        (third,) = take(connection, queue, 1)
        assert held([first.delivery_tag]) == [], "written with the third message's delivery"
        assert held([second.delivery_tag, third.delivery_tag]) == [
            second.delivery_tag,
            third.delivery_tag,
        ]

        second.ack()
        deadline = time.monotonic() + 5 * redis_transport.ACK_FLUSH_SECONDS
        while held([second.delivery_tag]) and time.monotonic() < deadline:
            hub.fire_timers(propagate=(Exception,))
            time.sleep(redis_transport.ACK_FLUSH_SECONDS / 5)
        assert held([second.delivery_tag]) == [], "the event loop's flush wrote it"

        third.ack()
        connection.default_channel.close()
        assert held([third.delivery_tag]) == [], "the channel's close wrote it"
    finally:
        hub.close()


def test_a_message_taken_and_not_acknowledged_stays_held_through_later_acks(connection, queue):
    """The batch removes only what was acknowledged: an unacknowledged message still comes back
    if its worker dies."""
    hub = Hub()
    try:
        connection.transport.register_with_event_loop(connection.connection, hub)
        messages = take(connection, queue, 5)
        for message in messages[1:]:
            message.ack()
        connection.transport._flush_acks()
        tags = [message.delivery_tag for message in messages]
        assert held(tags) == [messages[0].delivery_tag]
        # What a SIGKILLed worker leaves is what kombu's own restore gives back.
        connection.default_channel.qos.restore_unacked()
        client = redis.Redis.from_url(current_config().broker_url)
        assert held(tags) == []
        waiting = [raw for key in client.keys(f"{queue}*") for raw in client.lrange(key, 0, -1)]
        assert [json.loads(raw)["properties"]["delivery_tag"] for raw in waiting] == [
            messages[0].delivery_tag
        ]
    finally:
        hub.close()


@pytest.mark.worker
def test_a_workers_finished_executions_leave_nothing_held(live_client, live_org):
    """The session's worker (prefork, its event loop flushing): once its executions ended, the
    messages it took are gone from `unacked` within a few flushes, however many it took."""
    created = live_client.post(
        "/api/v1/agents",
        json={"name": "echo", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}},
        headers=live_org.headers,
    )
    assert created.status_code == 201, created.get_json()
    ids = []
    for n in range(6):
        response = live_client.post(
            "/api/v1/agents/echo/executions", json={"input": {"n": n}}, headers=live_org.headers
        )
        assert response.status_code == 202, response.get_json()
        ids.append(response.get_json()["id"])
    assert {wait_for(live_client, live_org, i)["status"] for i in ids} == {"succeeded"}
    client = redis.Redis.from_url(current_config().broker_url)

    def still_held() -> set[str]:
        raws = client.hvals("unacked")
        return {json.loads(raw)[0]["headers"]["id"] for raw in raws} & set(ids)

    deadline = time.monotonic() + 20 * redis_transport.ACK_FLUSH_SECONDS
    while still_held() and time.monotonic() < deadline:
        time.sleep(redis_transport.ACK_FLUSH_SECONDS / 5)
    assert still_held() == set()


def test_a_record_redis_refuses_is_logged_and_its_acks_written_by_the_next(queue, caplog):
    """In an event loop a delivery's record goes without waiting for Redis's reply, which is
    read before the next write: a refusal is then logged, naming the delivery left unrecorded,
    and the acks the refused write carried go with a later one. A reject meanwhile is not
    refused for it."""
    unacked_key, index_key = f"{queue}:unacked", f"{queue}:unacked_index"
    with Connection(
        current_config().broker_url,
        transport="workers.redis_transport:Transport",
        transport_options={"unacked_key": unacked_key, "unacked_index_key": index_key},
    ) as connection:
        hub = Hub()
        try:
            connection.transport.register_with_event_loop(connection.connection, hub)
            client = redis.Redis.from_url(current_config().broker_url)
            qos = connection.default_channel.qos
            (first,) = take(connection, queue, 1)
            assert client.hexists(unacked_key, first.delivery_tag)

            first.ack()
            client.delete(index_key)
            client.set(index_key, "not a sorted set")  # ZREM and ZADD are refused now
            with connection.Producer() as producer:
                producer.publish({"n": 1}, routing_key=queue, serializer="json")
            second = connection.default_channel.basic_get(queue)
            assert second is not None, "handed over: the refusal is not known yet"
            # Its transaction ran (the HSET went through, the ZADD did not): the index again.
            deadline = time.monotonic() + 5
            while not client.hexists(unacked_key, second.delivery_tag):
                assert time.monotonic() < deadline, "the record never reached Redis"
                time.sleep(0.01)
            client.delete(index_key)

            with caplog.at_level("WARNING", logger="workers.redis_transport"):
                second.reject(requeue=True)
            assert f"did not record message {second.delivery_tag}" in caplog.text
            again = connection.default_channel.basic_get(queue)
            assert again is not None and again.delivery_tag == second.delivery_tag, (
                "the reject gave the message back to its queue"
            )

            qos.flush_acks()
            assert not client.hexists(unacked_key, first.delivery_tag), (
                "the refused write's ack went with a later one"
            )
        finally:
            hub.close()
