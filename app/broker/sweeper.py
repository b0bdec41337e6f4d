"""The sweeper's side of the broker (app/executions/recovery.py): what a worker took and what a
queue holds, read from kombu's Redis keys; and BrokerWatch, which notices a broker that lost its
data or restarted, and keeps the sweepers' lock and recovery state.

On Redis all of it lives in the broker's own database. On RabbitMQ nothing taken by a worker
needs giving back (RabbitMQ gives a dead consumer's unacknowledged messages back by itself), the
messages waiting in a queue are read and given back, and the marker is a durable queue holding
one persistent message; the lock and the recovery state live in REDIS_URL's Redis, which Runyard
needs anyway (chords' result backend, token buckets).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import amqp
import redis
from kombu.exceptions import OperationalError

from app.broker import RUN_TASK, celery_app, is_amqp


@contextlib.contextmanager
def _redis_channel() -> Iterator[Any]:
    with celery_app.connection_for_write() as connection:
        yield connection.default_channel


def restore_taken(
    still_queued: Callable[[list[uuid.UUID]], set[uuid.UUID]], cutoff: float, page_size: int
) -> int:
    """Give back to its queue every run message taken before `cutoff` (or due before it, for a
    countdown message) whose execution `still_queued` names; the number given back.

    Restored with kombu's own `restore_by_tag` (what the visibility timeout does), one
    transaction per message, so a message is either still held or back in its queue, never
    both or neither."""
    restored_in_all = 0
    with _redis_channel() as channel:
        client = channel.client
        offset = 0
        while True:
            tags = client.zrangebyscore(
                channel.unacked_index_key, "-inf", cutoff, start=offset, num=page_size
            )
            if not tags:
                return restored_in_all
            taken = _taken_run_messages(channel, client, tags, cutoff)
            stranded = still_queued(list(taken)) if taken else set()
            for execution_id in stranded:
                channel.qos.restore_by_tag(taken[execution_id], client=client)
            restored = len(stranded)
            restored_in_all += restored
            # A restored message leaves the index: the next page starts that much earlier.
            offset += len(tags) - restored


def _taken_run_messages(
    channel: Any, client: redis.Redis, tags: list[bytes], cutoff: float
) -> dict[uuid.UUID, bytes]:
    """execution id -> the delivery tag of its run message taken before `cutoff`."""
    taken: dict[uuid.UUID, bytes] = {}
    for tag, raw in zip(tags, client.hmget(channel.unacked_key, tags), strict=True):
        if raw is None:
            continue  # acknowledged meanwhile
        headers = json.loads(raw)[0].get("headers") or {}
        if headers.get("task") != RUN_TASK:
            continue  # chain steps: the chains' resume check recovers those
        eta = headers.get("eta")
        if eta and dt.datetime.fromisoformat(eta).timestamp() > cutoff:
            continue
        with contextlib.suppress(KeyError, ValueError, TypeError):
            taken[uuid.UUID(headers["id"])] = tag
    return taken


def message_ids_held(queues: set[str], scan_limit: int) -> tuple[set[str], set[str]]:
    """(the task ids of every message in `queues` or taken by a worker, the queues holding more
    than `scan_limit` messages, which were not read). On RabbitMQ, the messages waiting in the
    queues only: what its consumers hold cannot be read."""
    if is_amqp(celery_app.conf.broker_url):
        return _ids_waiting_in_rabbitmq(queues, min(scan_limit, AMQP_SCAN_LIMIT))
    with _redis_channel() as channel:
        client = channel.client
        present = _message_ids(client.hvals(channel.unacked_key))
        unread: set[str] = set()
        for queue in queues:
            keys = [channel._q_for_pri(queue, step) for step in channel.priority_steps]
            if sum(client.llen(key) for key in keys) > scan_limit:
                unread.add(queue)
                continue
            for key in keys:
                present |= _message_ids(client.lrange(key, 0, -1), queued=True)
    return present, unread


# RabbitMQ has no peek: each message is fetched (basic.get, one round trip) and given back, and
# while read the head of the queue is held from the workers (they are served what is behind it).
# A small bound keeps that to a moment per sweep; a deeper queue is read once it has drained
# below it (a message missing from a long queue is not late yet).
AMQP_SCAN_LIMIT = 500


def _ids_waiting_in_rabbitmq(queues: set[str], scan_limit: int) -> tuple[set[str], set[str]]:
    """Read every message waiting in the queues without acknowledging it, on a channel of its
    own: closing the channel gives them back to their queue, in their place (redelivered set,
    which Celery ignores). While read they are held from the workers for a moment."""
    present: set[str] = set()
    unread: set[str] = set()
    with celery_app.connection_or_acquire() as connection:
        connection.ensure_connection(max_retries=1)
        for queue in queues:
            channel = connection.channel()
            try:
                try:
                    waiting = channel.queue_declare(queue, passive=True)[1]
                except amqp.exceptions.NotFound:
                    continue  # no queue, no message (the failed declare closed the channel)
                if waiting > scan_limit:
                    unread.add(queue)
                    continue
                for _ in range(waiting):
                    message = channel.basic_get(queue, no_ack=False)
                    if message is None:
                        break
                    task_id = (message.headers or {}).get("id")
                    if task_id:
                        present.add(task_id)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
    return present, unread


def _message_ids(raw_messages: list[bytes], *, queued: bool = False) -> set[str]:
    """Task ids of raw kombu messages: as queued (the message), or as in `unacked` (a list
    holding the message first)."""
    ids = set()
    for raw in raw_messages:
        message = json.loads(raw)
        headers = (message if queued else message[0]).get("headers") or {}
        if "id" in headers:
            ids.add(headers["id"])
    return ids


# ---------------------------------------------------------------------------------------------
# The sweeper's marker, lock and recovery state


# What a sweep meets when the broker (or, with RabbitMQ, REDIS_URL's Redis) cannot be reached.
BrokerError = (redis.RedisError, OSError, amqp.exceptions.AMQPError, OperationalError)

# Keys the sweeper keeps in the broker's Redis database.
MARKER_KEY = "runyard:broker-marker"
RECOVERY_KEY = "runyard:sweeper:recovery"
LOCK_KEY = "runyard:sweeper:lock"
DATABASE_AWAY_KEY = "runyard:sweeper:database-away-since"

# Compare the marker with the server's run_id and, when they differ, set it and open a recovery,
# as one atomic step: of two sweeps (two beats) only one sees the change.
_CHECK_MARKER = """
local old = redis.call('GET', KEYS[1])
if old == ARGV[1] then return old end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return old or ''
"""


class BrokerWatch:
    """Notices that the broker may have lost messages, and keeps the recovery's place.

    Celery messages exist only in the broker. A Redis flushed, or restarted without its data
    (or whose last second of appendonly writes died with it), drops the messages of rows that
    are `queued` and already stamped `dispatched_at`: nothing else would publish them again. A
    Redis restarted *with* its data strands messages too: those the workers had reserved sit in
    kombu's `unacked` hash until the visibility timeout, hours away (above the longest agent
    timeout).

    So each sweep compares a marker key in the broker's Redis database with the server's
    `run_id` (new at every start of redis-server) and, in the same Lua call, sets it when they
    differ. A missing marker (data lost) or another run_id (a restart) opens a recovery: every
    row queued until that moment is published again, in (queued_at, id) order across as many
    sweeps as it takes, and chains are resumed without their stall grace for the next
    RUNYARD_CHAIN_STALL_SECONDS. Duplicate messages are harmless: the claim takes a queued row
    once and drops the rest (a retry waiting out its backoff may start early).

    On RabbitMQ a restart loses nothing: queues are durable, messages persistent and published
    with confirms (a row is stamped dispatched only once its message is on disk), and a dead
    consumer's unacknowledged messages go back to their queue at once. What loses messages is
    a node that lost its data (reset, a new node without the old one's disk, its vhost
    deleted): the marker is then a durable queue, MARKER_QUEUE, holding one persistent message.
    A sweep that finds it missing or empty declares it again, puts the message back and opens
    the same recovery. A single run queue deleted or purged by hand is not noticed (the marker
    is still there): README, "Choosing a broker".

    - The first sweep ever finds no marker: it cannot tell a new broker from one that lost its
      data and republishes the queued rows once.
    - Two beats: sweeps take turns on a lock in the same Redis, and the check runs under it
      (on Redis the compare-and-set is atomic besides), so one recovery opens per reset.
    - Running executions are unaffected: their workers finish and record them, and the ack of a
      message the new broker never held deletes nothing and raises nothing.
    - The marker must not be evicted: a Celery broker on Redis needs `maxmemory-policy
      noeviction`, and so does REDIS_URL's Redis when the broker is RabbitMQ.

    It also keeps, for DatabaseOutages (app/executions/leases.py), since when the sweepers have
    found the database away: every beat shares it, and a beat restarted after the outage knows.
    """

    def __init__(self, client: redis.Redis, *, amqp_marker: bool = False) -> None:
        self.client = client
        self.amqp_marker = amqp_marker

    @property
    def reads_messages(self) -> bool:
        """Whether the sweeper can read, and must give back, what workers took (Redis only)."""
        return not self.amqp_marker

    @classmethod
    def for_broker(cls, broker_url: str, redis_url: str) -> BrokerWatch | None:
        if broker_url.startswith(("redis://", "rediss://")):
            return cls(_watch_client(broker_url))
        if is_amqp(broker_url):
            return cls(_watch_client(redis_url), amqp_marker=True)
        return None

    @contextlib.contextmanager
    def exclusive(self, seconds: float) -> Iterator[bool]:
        """Whether this sweep holds the sweepers' lock (free again after `seconds` at most)."""
        lock = self.client.lock(LOCK_KEY, timeout=seconds, blocking=False)
        held = lock.acquire()
        try:
            yield held
        finally:
            if held:
                # Gone already if Redis lost its data meanwhile.
                with contextlib.suppress(redis.exceptions.LockError, redis.RedisError):
                    lock.release()

    def check(self, chains_for_seconds: float) -> str | None:
        """None, or what happened to the broker since the last sweep (called under the lock)."""
        recovery = json.dumps({"chains_until": time.time() + chains_for_seconds})
        if self.amqp_marker:
            if _marker_queue_held():
                return None
            # The recovery first, the marker after: a sweep that dies in between leaves the
            # marker missing, and the next one opens the recovery again (harmless), never a
            # marker back without its recovery.
            self.client.set(RECOVERY_KEY, recovery)
            _put_marker_back()
            return "lost its data (or this is the first sweep)"
        run_id = self.client.info("server")["run_id"]
        old = self.client.eval(_CHECK_MARKER, 2, MARKER_KEY, RECOVERY_KEY, run_id, recovery)
        old = old.decode() if isinstance(old, bytes) else old
        if old == run_id:
            return None
        if old:
            return "restarted"
        return "lost its data (or this is the first sweep)"

    def recovery(self) -> dict[str, Any] | None:
        raw = self.client.get(RECOVERY_KEY)
        return json.loads(raw) if raw else None

    def save(self, state: dict[str, Any]) -> None:
        self.client.set(RECOVERY_KEY, json.dumps(state))

    def forget_recovery(self) -> None:
        self.client.delete(RECOVERY_KEY)

    # Best effort: a Redis that cannot be reached leaves the process's own memory to count.

    def note_database_away(self, since: float) -> None:
        with contextlib.suppress(redis.RedisError):
            self.client.set(DATABASE_AWAY_KEY, since, nx=True)

    def database_away_since(self) -> float | None:
        with contextlib.suppress(redis.RedisError, ValueError):
            stored = self.client.get(DATABASE_AWAY_KEY)
            if stored is not None:
                return float(stored)
        return None

    def forget_database_away(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.client.delete(DATABASE_AWAY_KEY)


def _watch_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


# A classic durable queue no worker consumes, holding one persistent message: RabbitMQ keeps
# both across restarts, and loses them only with the rest of its data.
MARKER_QUEUE = "runyard.broker-marker"


def _marker_queue_held() -> bool:
    """Whether RabbitMQ still holds the marker message."""
    with celery_app.connection_or_acquire() as connection:
        connection.ensure_connection(max_retries=1)
        channel = connection.channel()
        try:
            _name, messages, _consumers = channel.queue_declare(MARKER_QUEUE, passive=True)
            return messages > 0
        except amqp.exceptions.NotFound:
            return False
        finally:
            # A failed passive declare closed the channel already.
            with contextlib.suppress(Exception):
                channel.close()


def _put_marker_back() -> None:
    """The marker queue and its one persistent message, for the next sweeps to find."""
    with celery_app.connection_or_acquire() as connection:
        connection.ensure_connection(max_retries=1)
        channel = connection.channel()
        try:
            channel.queue_declare(MARKER_QUEUE, durable=True, auto_delete=False)
            channel.basic_publish_confirm(
                amqp.Message(b"runyard broker marker", delivery_mode=2),
                exchange="",
                routing_key=MARKER_QUEUE,
                mandatory=True,
            )
        finally:
            with contextlib.suppress(Exception):
                channel.close()
