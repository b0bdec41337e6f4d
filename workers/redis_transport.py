"""Kombu's Redis transport, keeping one Redis client per channel for publishing and acking,
and writing acknowledgements with the worker's next round trip to Redis.

Stock kombu builds a new redis-py client for every publish and every ack (`conn_or_acquire`);
redis-py's constructor alone costs about 0.1 ms of CPU, paid twice per execution. The client
is thread-safe and shares the channel's connection pool, so keeping it changes nothing else.
bench/throughput.py measured the worker's main process at 0.97 ms of CPU per execution with the
stock transport and 0.81 ms with this one. celeryconfig.py selects it for `redis://` brokers.

Stock kombu also acknowledges a message with a round trip of its own, in the worker's main
process, between a pool process finishing a task and that process being handed its next
message (prefetch 1), and waits for a second one that records the delivery in `unacked`
before handing it over: see `BatchedAckQoS` and `UnansweredWrites`. bench/throughput.py's
batch phase (-c 2, 2 cores) went from 805 to 955 executions a second when the record stopped
waiting for its reply.
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
    ACK_FLUSH_SECONDS when no delivery comes, and to the channel's close. In an event loop
    these writes go without waiting for Redis's reply (UnansweredWrites).

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
        self._writes = UnansweredWrites(self)

    def append(self, message, delivery_tag) -> None:
        if not self._flushes_acks():
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        acked = self._take_acked()
        commands = self._removals(acked) if acked else []
        commands.append(("ZADD", self.unacked_index_key, time(), delivery_tag))
        commands.append(
            (
                "HSET",
                self.unacked_key,
                delivery_tag,
                redis.dumps([message._raw, delivery["exchange"], delivery["routing_key"]]),
            )
        )
        self._writes.send(commands, acked, delivery_tag)
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag) -> None:
        # Without an event loop's timer to flush them (Transport.register_with_event_loop),
        # acks are written at once, as kombu's are.
        if not self._flushes_acks():
            super().ack(delivery_tag)
            return
        with self._acked_lock:
            self._acked.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag, requeue=False) -> None:
        # Kombu's reject reads and writes `unacked` on another connection. A refusal of an
        # earlier write is that write's (logged), not this reject's: it goes on.
        self._writes.settle(raise_refused=False)
        super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client=None) -> None:
        self._writes.settle(raise_refused=False)
        super().restore_unacked(client)

    def flush_acks(self) -> None:
        """Write the acks not written yet, and wait until Redis took every write sent."""
        acked = self._take_acked()
        if acked:
            self._writes.send(self._removals(acked), acked, None)
        self.settle()

    def settle(self) -> None:
        """Wait for the replies of the writes sent: Redis has applied them. A refused one
        raises (after it was logged, and its acks kept for a later write)."""
        self._writes.settle()

    def flush_acks_from_timer(self) -> None:
        """The event loop's flush: a broker that refuses (away, read-only after a failover)
        keeps the acks pending for the next try, and is logged once a minute at most."""
        try:
            self.flush_acks()
        except Exception:
            if time() - self._flush_failed_at > 60:
                self._flush_failed_at = time()
                log.warning("could not write acknowledgements; trying again", exc_info=True)

    def drop_connection(self) -> None:
        self._writes.drop()

    def _flushes_acks(self) -> bool:
        return getattr(self.channel.connection.cycle, "flushes_acks", False)

    def _take_acked(self) -> list:
        with self._acked_lock:
            acked, self._acked = self._acked, []
        return acked

    def _give_back(self, acked: list) -> None:
        with self._acked_lock:
            self._acked[:0] = acked

    def _removals(self, tags: list) -> list[tuple]:
        return [("ZREM", self.unacked_index_key, *tags), ("HDEL", self.unacked_key, *tags)]


class UnansweredWrites:
    """The QoS's writes to `unacked`, on a Redis connection of their own, sent without waiting
    for Redis's reply: the worker's main process hands the message to a pool process at once,
    and reads the replies before its next write (they came in meanwhile, as a rule).

    Each write is a MULTI/EXEC transaction, as kombu's pipeline is: no extra round trip.

    What it risks: a write Redis refuses is known at the next write or the event loop's flush
    (ACK_FLUSH_SECONDS). Its acks are kept for a later write; its delivery is then not
    recorded in `unacked`, which is logged: should the worker die before the claim, the
    sweeper republishes the execution (app/executions/recovery.py:_republish_vanished).
    Stock kombu has the same kind of window between taking a message (BRPOP) and recording
    it. A reject and a restore of what this worker holds settle these writes first: they
    read `unacked` on another connection. (Kombu's restore of messages past the visibility
    timeout, hours old, needs no such wait.)"""

    def __init__(self, qos: BatchedAckQoS) -> None:
        self._qos = qos
        self._connection = None
        self._pool = None  # the connection's: it goes back there when dropped
        self._lock = threading.Lock()
        # The last write sent: its command count, its acks, its delivery tag.
        self._unanswered: tuple[int, list, str | None] | None = None

    def send(self, commands: list[tuple], acked: list, delivery_tag: str | None) -> None:
        with self._lock:
            # A refused earlier write has given back its acks (for a later write to carry)
            # and dropped its connection (this write takes another).
            self._read_replies()
            try:
                connection = self._connection
                if connection is None:
                    self._pool = self._qos.channel.pool
                    connection = self._connection = self._pool.get_connection()
                connection.send_packed_command(
                    connection.pack_commands([("MULTI",), *commands, ("EXEC",)])
                )
            except Exception:
                self._drop()
                self._qos._give_back(acked)
                raise
            # MULTI, one QUEUED per command, EXEC.
            self._unanswered = (len(commands) + 2, acked, delivery_tag)

    def settle(self, raise_refused: bool = True) -> None:
        with self._lock:
            refused = self._read_replies()
        if refused is not None and raise_refused:
            raise refused

    def drop(self) -> None:
        with self._lock:
            self._drop()

    def _read_replies(self) -> Exception | None:
        if self._unanswered is None:
            return None
        count, acked, delivery_tag = self._unanswered
        self._unanswered = None
        try:
            for _ in range(count):
                reply = self._connection.read_response()
            # EXEC's: a command Redis refused when it ran (a wrong type) is an error in it.
            for result in reply:
                if isinstance(result, Exception):
                    raise result
        except Exception as exc:
            self._drop()
            self._qos._give_back(acked)
            if delivery_tag is not None:
                log.warning(
                    "Redis did not record message %s as taken (it is running); should this "
                    "worker die before its claim, the sweeper publishes its execution again",
                    delivery_tag,
                    exc_info=True,
                )
            return exc
        return None

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self._unanswered = None
        if connection is not None:
            connection.disconnect()
            # Back to its pool, or the pool counts it in use for good (max_connections).
            self._pool.release(connection)


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
        super().close()  # kombu's close disconnects the pools: _disconnect_pools drops ours

    def _disconnect_pools(self) -> None:
        # After a fork or a lost connection the pool is rebuilt: the client must follow it.
        self._shared_client = None
        if isinstance(self._qos, BatchedAckQoS):
            self._qos.drop_connection()
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
