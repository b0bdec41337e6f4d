"""The one module of app/ that speaks Celery, kombu and Redis.

The Celery app lives here (`workers/__init__.py` re-exports it for `celery -A workers`), and so
does everything the layers above ask of the broker: send one execution's message (with a
countdown), many in bulk, a chain's canvas; ping the broker and inspect the workers; and the
sweeper's reads of kombu's Redis keys (what a worker took, what a queue holds) and its marker
keys (BrokerWatch). A kombu upgrade that moves those internals breaks this module only.

Functions here raise the transport's errors; the callers decide what a broker outage means.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, chain, group

from app.config import current_config

celery_app = Celery("runyard", include=["workers.tasks", "workers.chains"])
celery_app.config_from_object("celeryconfig")

RUN_TASK = "runyard.run_execution"
STEP_TASK = "runyard.chain_step"
NOTIFY_TASK = "runyard.deliver_notifications"

# Results live in PostgreSQL: no result channel to subscribe to per message (a chord still
# counts its header tasks in the result backend).
_NO_RESULT = {"ignore_result": True}
_SEND_RETRY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2}


def _broker_priority(priority: int) -> int:
    # Redis serves the lowest priority number first; the API's 9 is the most urgent.
    return 9 - priority


# What Flower, `celery inspect` and the workers' logs show of a message: Celery's protocol 2
# headers `shadow` (the name shown instead of the task's) and `argsrepr` (shown instead of the
# arguments). They name the agent version and organization, never the input: anyone who can
# see Flower or the logs sees them. Names are bounded, so a header stays small.
LABEL_MAX = 64


def _bounded(name: str) -> str:
    return name if len(name) <= LABEL_MAX else name[: LABEL_MAX - 3] + "..."


@functools.lru_cache(maxsize=1024)
def _run_labels(agent: str, version: str, org: str) -> tuple[str, str]:
    """(shadow, the argsrepr after the id) of a run message: built once per version and org,
    not per message (the bulk publish copies them into each message's headers)."""
    what = f"{_bounded(agent)}@{_bounded(version)}"
    return f"run {what}", f"{what} org={_bounded(org)}"


@dataclass(frozen=True)
class RunMessage:
    """The message that runs one execution: its id only, and the time limits of its version;
    its agent, version and organization (names, or the id when a caller has no name) are shown
    by Flower and the logs only (`shadow`, `argsrepr`)."""

    execution_id: uuid.UUID
    queue: str
    priority: int
    soft_time_limit: float
    time_limit: float
    agent: str
    version: str
    org: str

    def labels(self) -> tuple[str, str]:
        """(shadow, argsrepr): `run summarize-ticket@1.2.0` and
        `'<id>' summarize-ticket@1.2.0 org=acme`."""
        shadow, described = _run_labels(self.agent, self.version, self.org)
        return shadow, f"'{self.execution_id}' {described}"


def send_run(message: RunMessage, *, countdown: float | None = None, producer: Any = None) -> None:
    shadow, argsrepr = message.labels()
    celery_app.send_task(
        RUN_TASK,
        args=[str(message.execution_id)],
        task_id=str(message.execution_id),
        shadow=shadow,
        argsrepr=argsrepr,
        queue=message.queue,
        priority=_broker_priority(message.priority),
        countdown=countdown,
        soft_time_limit=message.soft_time_limit,
        time_limit=message.time_limit,
        producer=producer,
        retry=True,
        retry_policy=_SEND_RETRY,
        **_NO_RESULT,
    )


def send_notifications(event_ids: list[uuid.UUID]) -> None:
    """Ask a worker to deliver these notification events now (app/outbox.py)."""
    celery_app.send_task(
        NOTIFY_TASK,
        args=[[str(event_id) for event_id in event_ids]],
        queue=current_config().notify_queue,
        retry=True,
        retry_policy=_SEND_RETRY,
        **_NO_RESULT,
    )


def send_runs_in_bulk(messages: list[RunMessage]) -> None:
    """Send run messages, one or thousands at once (submits, a minute's schedules): the
    messages send_run makes, built faster. Celery builds the task message once per process and
    time limits, and each execution gets a copy carrying its own id. On Redis
    (workers.redis_transport) each queue and priority then goes out as one LPUSH; other brokers
    get kombu's producer, message by message. What send_task repeats per message (routing,
    signals, the repr of the arguments) and Producer.publish's layers were most of the cost of
    publishing 10,000 (bench/schedules.py: about 4 s with send_task, under 0.5 s this way)."""
    groups: dict[tuple[str, int, float, float], list[RunMessage]] = {}
    for message in messages:
        key = (message.queue, message.priority, message.soft_time_limit, message.time_limit)
        groups.setdefault(key, []).append(message)
    with celery_app.producer_or_acquire() as producer, producer.batch():
        for (queue_name, priority, soft_limit, hard_limit), members in groups.items():
            queue = celery_app.amqp.queues[queue_name]
            envelopes = _envelopes(queue, soft_limit, hard_limit, members)
            bulk = getattr(producer.channel, "publish_bulk", None)
            if bulk is not None:
                # workers.redis_transport: one LPUSH per group, to the queue's list itself (no
                # exchange to declare or route through: a Redis queue is its list).
                bulk(queue.name, _broker_priority(priority), envelopes)
                continue
            producer.maybe_declare(queue)
            for body, headers, properties in envelopes:
                producer.publish(
                    body,
                    # A direct exchange: routed by queue name, as send_task does.
                    exchange="",
                    routing_key=queue.name,
                    content_type="application/json",
                    content_encoding="utf-8",
                    headers=headers,
                    priority=_broker_priority(priority),
                    **properties,
                )


def _envelopes(
    queue: Any, soft_limit: float, hard_limit: float, members: list[RunMessage]
) -> list[tuple[str, dict, dict]]:
    """(body, headers, properties) of each message: one task message, copied per id."""
    headers, properties, body = _task_message(soft_limit, hard_limit)
    delivery_mode = queue.exchange.delivery_mode or celery_app.conf.task_default_delivery_mode
    envelopes = []
    for message in members:
        task_id = str(message.execution_id)
        shadow, argsrepr = message.labels()
        envelopes.append(
            (
                json.dumps([[task_id], body[1], body[2]]),
                {
                    **headers,
                    "id": task_id,
                    "root_id": task_id,
                    "shadow": shadow,
                    "argsrepr": argsrepr,
                },
                {
                    "correlation_id": task_id,
                    "reply_to": properties["reply_to"],
                    "delivery_mode": delivery_mode,
                },
            )
        )
    return envelopes


@functools.lru_cache(maxsize=256)
def _task_message(soft_limit: float, hard_limit: float) -> tuple[dict, dict, tuple]:
    """The run task's message for these time limits, built once per process: it holds nothing
    of one execution (the id, shadow and argsrepr are set per copy) and Celery's building it
    was a third of the cost of publishing one message (a claim letting out the next execution
    held back)."""
    headers, properties, body, _sent_event = celery_app.amqp.as_task_v2(
        "",
        RUN_TASK,
        args=[""],
        kwargs={},
        soft_time_limit=soft_limit,
        time_limit=hard_limit,
        **_NO_RESULT,
    )
    return headers, properties, body


# ---------------------------------------------------------------------------------------------
# Chains: a canvas of step tasks


@dataclass(frozen=True)
class StepMessage:
    """One step task of a chain's canvas: which step of which chain execution to start; what
    Flower and the logs show of it (`shadow`, `argsrepr`): the chain, version and step, the
    step's agent version and the organization."""

    chain_execution_id: uuid.UUID
    chain_version_id: uuid.UUID
    stage: int
    index: int
    queue: str
    priority: int
    soft_time_limit: float
    time_limit: float
    chain: str
    chain_version: str
    step: str
    agent: str
    version: str
    org: str
    compensation: bool = False

    def labels(self) -> tuple[str, str]:
        """(shadow, argsrepr): `step triage@2.0.0/extract` (`compensate ...` for a
        compensation) and `'<chain execution id>' stage=0 index=1 summarize-ticket@1.2.0
        org=acme`."""
        kind = "compensate" if self.compensation else "step"
        shadow = f"{kind} {_bounded(self.chain)}@{_bounded(self.chain_version)}/"
        described = _run_labels(self.agent, self.version, self.org)[1]
        return (
            shadow + _bounded(self.step),
            f"'{self.chain_execution_id}' stage={self.stage} index={self.index} {described}",
        )


def send_canvas(stages: list[list[StepMessage]], *, declare: bool = False) -> bool:
    """Send the stages as one Celery canvas: a chain of the stages, a stage of several steps a
    group, and Celery makes the step after a group its chord body. False when there is
    nothing to send."""
    parts = []
    for members in stages:
        signatures = [_signature(member) for member in members]
        if signatures:
            parts.append(signatures[0] if len(signatures) == 1 else group(signatures))
    if not parts:
        return False
    if declare:
        _declare({member.queue for members in stages for member in members})
    (parts[0] if len(parts) == 1 else chain(*parts)).apply_async()
    return True


def _signature(step: StepMessage):
    signature = celery_app.signature(
        STEP_TASK,
        args=[str(step.chain_execution_id), str(step.chain_version_id), step.stage, step.index],
        queue=step.queue,
        immutable=True,
        soft_time_limit=step.soft_time_limit,
        time_limit=step.time_limit,
        **_NO_RESULT,
    )
    shadow, argsrepr = step.labels()
    # Options, not headers: a chain's later steps are published by the worker that ran the
    # step before, from the options the canvas carries.
    signature.set(priority=_broker_priority(step.priority), shadow=shadow, argsrepr=argsrepr)
    return signature


def _declare(queues: set[str]) -> None:
    """Bind the queues again. A broker that lost its data lost the bindings too, and a
    publisher that declared them once never declares them again: its messages would be dropped
    as unroutable."""
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        for name in queues:
            celery_app.amqp.queues[name](channel).declare()


# ---------------------------------------------------------------------------------------------
# Asking the broker and the workers


def ping(max_retries: int, timeout: float) -> None:
    """Raise unless the broker answers within `timeout`."""
    with celery_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=max_retries, timeout=timeout)


def inspect_workers(
    questions: tuple[str, ...], timeout: float, on_reply: Callable[[dict[str, Any]], None]
) -> dict[str, dict[str, Any]]:
    """Broadcast Celery's inspect questions in parallel: question -> {worker name: reply}."""
    # One quick try first: a broadcast to a broker that is down retries for seconds.
    ping(max_retries=0, timeout=timeout)
    inspector = celery_app.control.inspect(timeout=timeout, callback=on_reply)
    with ThreadPoolExecutor(len(questions), thread_name_prefix="inspect") as pool:
        futures = {question: pool.submit(getattr(inspector, question)) for question in questions}
    return {question: future.result() or {} for question, future in futures.items()}


# ---------------------------------------------------------------------------------------------
# The sweeper's reads of kombu's Redis keys


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
    than `scan_limit` messages, which were not read)."""
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
# The sweeper's own keys in the broker's Redis


BrokerError = redis.RedisError

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
    """Notices that the broker's Redis may have lost messages, and keeps the recovery's place.

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

    - The first sweep ever finds no marker: it cannot tell a new Redis from a flushed one and
      republishes the queued rows once.
    - Two beats: sweeps take turns on a lock in the same Redis, and the compare-and-set is
      atomic, so one recovery opens per reset.
    - Brokers other than `redis://` / `rediss://` are not watched: RabbitMQ keeps persistent
      messages in durable queues across restarts, and gives back unacknowledged ones at once.
    - Running executions are unaffected: their workers finish and record them, and the ack of a
      message the new Redis never held deletes nothing and raises nothing.
    - The marker must not be evicted: a Celery broker needs `maxmemory-policy noeviction`.

    It also keeps, for DatabaseOutages (app/executions/leases.py), since when the sweepers have
    found the database away: every beat shares it, and a beat restarted after the outage knows.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @classmethod
    def for_broker(cls, broker_url: str) -> BrokerWatch | None:
        if not broker_url.startswith(("redis://", "rediss://")):
            return None
        return cls(redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5))

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
        """None, or what happened to the broker since the last sweep."""
        run_id = self.client.info("server")["run_id"]
        recovery = json.dumps({"chains_until": time.time() + chains_for_seconds})
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


# ---------------------------------------------------------------------------------------------
# Shared token buckets (app/flow: an organization's submit rate over every API process)


# Refill by the server's clock (one clock for every API process), then take `n` if there are.
_TAKE_TOKENS = """
local rate, burst, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local taken = 0
if tokens >= n then
  tokens = tokens - n
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {taken, tostring(tokens)}
"""


@dataclass(frozen=True)
class Bucket:
    taken: bool
    # Tokens left after this call (fractional while refilling).
    tokens: float


@functools.cache
def _bucket_client(url: str) -> redis.Redis:
    # redis-py's pool notices a fork and reconnects: one client per process and URL.
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def take_tokens(key: str, rate: float, burst: int, n: int = 1) -> Bucket:
    """Take `n` tokens from the bucket `key` (refilled at `rate` a second up to `burst`), in the
    Redis every API process shares (REDIS_URL); raises BrokerError when it cannot be reached."""
    client = _bucket_client(current_config().redis_url)
    taken, tokens = client.eval(_TAKE_TOKENS, 1, f"runyard:bucket:{key}", rate, burst, n)
    return Bucket(bool(taken), float(tokens))
