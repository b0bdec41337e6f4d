"""Kombu's Redis transport, keeping one Redis client per channel for publishing and acking,
and writing acknowledgements with the worker's next round trip to Redis.

Stock kombu builds a new redis-py client for every publish and every ack (`conn_or_acquire`);
redis-py's constructor alone costs about 0.1 ms of CPU, paid twice per execution. The client
is thread-safe and shares the channel's connection pool, so keeping it changes nothing else.
bench/throughput.py measured the worker's main process at 0.97 ms of CPU per execution with the
stock transport and 0.81 ms with this one. celeryconfig.py selects it for `redis://` brokers.

Stock kombu also acknowledges a message with a round trip of its own, in the worker's main
process, between a pool process finishing a task and that process being handed its next
message (prefetch 1): see `BatchedAckQoS`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from time import time

from kombu.transport import redis, virtual
from redis import exceptions as redis_errors

log = logging.getLogger(__name__)

# How often the worker's event loop writes the acknowledgements no delivery carried.
ACK_FLUSH_SECONDS = 0.25


class BatchedAckQoS(redis.QoS):
    """Redis ack emulation whose acknowledgements ride in the next delivery's round trip.

    Kombu keeps every message a worker took in the `unacked` hash (and its index) until the
    ack removes it; a message still there when its worker dies comes back. Stock kombu removes
    it at once, with a round trip the worker's main process waits for before it fetches the
    next message. Here the ack frees the prefetch slot at once and leaves the removal to the
    pipeline that records the next delivery (`append`), or to the event loop's flush every
    ACK_FLUSH_SECONDS when no delivery comes, and to the channel's close.

    What the delay risks: a worker killed before the removal is written leaves an acknowledged
    message in `unacked`, and the message comes back (kombu's visibility timeout, the sweeper's
    restore_taken for an execution still queued). A run message whose execution ran is dropped
    by the claim, as any duplicate is, and one whose execution waits out a retry's backoff
    may start that retry early; nothing runs twice, and nothing unacknowledged is dropped. Stock
    kombu has the same window, one round trip wide, between a task's end and its ack."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._acked: list = []
        # Acks may come from a pool's threads while the event loop takes them to write.
        self._acked_lock = threading.Lock()
        self._flush_failed_at = 0.0

    def append(self, message, delivery_tag) -> None:
        delivery = message.delivery_info
        acked = self._take_acked()
        try:
            with self.pipe_or_acquire() as pipe:
                if acked:
                    self._remove(pipe, acked)
                pipe.zadd(self.unacked_index_key, {delivery_tag: time()})
                pipe.hset(
                    self.unacked_key,
                    delivery_tag,
                    redis.dumps([message._raw, delivery["exchange"], delivery["routing_key"]]),
                )
                pipe.execute()
        except Exception:
            self._give_back(acked)  # written by the next round trip that succeeds
            raise
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag) -> None:
        # Without an event loop's timer to flush them (Transport.register_with_event_loop),
        # acks are written at once, as kombu's are.
        if not getattr(self.channel.connection.cycle, "flushes_acks", False):
            super().ack(delivery_tag)
            return
        with self._acked_lock:
            self._acked.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def flush_acks(self) -> None:
        acked = self._take_acked()
        if not acked:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                self._remove(pipe, acked)
                pipe.execute()
        except Exception:
            self._give_back(acked)
            raise

    def flush_acks_from_timer(self) -> None:
        """The event loop's flush: a broker that refuses (away, read-only after a failover)
        keeps the acks pending for the next try, and is logged once a minute at most."""
        try:
            self.flush_acks()
        except Exception:
            if time() - self._flush_failed_at > 60:
                self._flush_failed_at = time()
                log.warning("could not write acknowledgements; trying again", exc_info=True)

    def _take_acked(self) -> list:
        with self._acked_lock:
            acked, self._acked = self._acked, []
        return acked

    def _give_back(self, acked: list) -> None:
        with self._acked_lock:
            self._acked[:0] = acked

    def _remove(self, pipe, tags: list) -> None:
        pipe.zrem(self.unacked_index_key, *tags)
        pipe.hdel(self.unacked_key, *tags)


class Channel(redis.Channel):
    QoS = BatchedAckQoS
    _shared_client = None

    def _connparams(self, asynchronous=False):
        # Closing a channel after its connection was lost (Redis restarted) restores the
        # unacknowledged messages on a new client, and kombu builds that client's parameters
        # from a connection it may have detached already: an AttributeError there is "an
        # unrecoverable error" that stops the whole worker. As a connection error it is what
        # Celery ignores while it reconnects; the messages stay in `unacked`, where the
        # sweeper gives them back (app/executions/recovery.py:_restore_stranded, through
        # app/broker/sweeper.py:restore_taken).
        if self.connection.client is None:
            raise redis_errors.ConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)

    @contextmanager
    def conn_or_acquire(self, client=None) -> Iterator:
        if client:
            yield client
            return
        if self._shared_client is None:
            self._shared_client = self._create_client()
        yield self._shared_client

    def publish_bulk(
        self, queue: str, priority: int, messages: list[tuple[str, dict, dict]]
    ) -> None:
        """Many messages to one queue with a single LPUSH (Runyard's bulk publish of scheduled
        executions, app/broker:send_runs_in_bulk). Each (body, headers, properties)
        becomes the envelope basic_publish writes, built by kombu's own prepare_message and
        _inplace_augment_message; only Producer.publish's per-message layers are skipped."""
        payloads = []
        for body, headers, properties in messages:
            message = self.prepare_message(
                body, priority, "application/json", "utf-8", headers, properties
            )
            # The default exchange: the routing key is the queue.
            self._inplace_augment_message(message, "", queue)
            payloads.append(redis.dumps(message))
        if payloads:
            key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
            with self.conn_or_acquire() as client:
                # LPUSH a b c leaves a rightmost: consumers (BRPOP) still take them in order.
                client.lpush(key, *payloads)

    def close(self) -> None:
        if not self.closed and isinstance(self._qos, BatchedAckQoS):
            # The acknowledgements not written yet go before the connection does; a broker
            # that cannot take them gives those messages back later (see BatchedAckQoS).
            try:
                self._qos.flush_acks()
            except Exception:
                log.warning("could not write the last acknowledgements", exc_info=True)
        super().close()

    def _disconnect_pools(self) -> None:
        # After a fork or a lost connection the pool is rebuilt: the client must follow it.
        self._shared_client = None
        super()._disconnect_pools()


class Transport(redis.Transport):
    Channel = Channel

    def register_with_event_loop(self, connection, loop) -> None:
        super().register_with_event_loop(connection, loop)
        cycle = self.cycle
        # As kombu does for its own timers: an entry left from an earlier registration goes.
        old = getattr(cycle, "_ack_flush_tref", None)
        if old is not None:
            old.cancel()
        cycle._ack_flush_tref = loop.call_repeatedly(ACK_FLUSH_SECONDS, self._flush_acks)
        cycle.flushes_acks = True

    def _flush_acks(self) -> None:
        for channel in list(self.cycle._channels):
            if isinstance(channel._qos, BatchedAckQoS):
                channel._qos.flush_acks_from_timer()
