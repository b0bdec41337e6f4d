"""The one package of app/ that speaks Celery, kombu, py-amqp and Redis.

The Celery app lives here (`workers/__init__.py` re-exports it for `celery -A workers`), and so
does everything the layers above ask of the broker: send one execution's message (with a
countdown), many in bulk, a chain's canvas; ping the broker and inspect the workers. Beside it:
the sweeper's side of the broker (app/broker/sweeper.py: kombu's Redis keys, the marker that
notices a broker that lost its data) and the shared token buckets (app/broker/buckets.py).
A kombu upgrade that moves those internals breaks this package only.

Two brokers, equal for everything Runyard promises (README, "Choosing a broker"): Redis (kombu's
Redis transport, workers.redis_transport) and RabbitMQ (`amqp://`, py-amqp). Where they differ
(priority order, bulk publish, publisher confirms) the branch is here.

Functions here raise the transport's errors; the callers decide what a broker outage means.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import amqp
from celery import Celery, chain, group
from kombu.entity import DELIVERY_MODES

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


AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")


def is_amqp(broker_url: str) -> bool:
    return broker_url.startswith(AMQP_SCHEMES)


_AMQP = is_amqp(celery_app.conf.broker_url)
# A bulk publish waits this long at most for RabbitMQ to confirm every message it sent.
CONFIRM_TIMEOUT_SECONDS = 10.0


def _broker_priority(priority: int) -> int:
    # The API's 9 is the most urgent. RabbitMQ serves the highest number first (queues declared
    # with x-max-priority, celeryconfig.py); kombu's Redis transport the lowest.
    return priority if _AMQP else 9 - priority


class QueueMismatch(RuntimeError):
    """RabbitMQ refused to declare a queue: it exists with other arguments."""


@contextlib.contextmanager
def _explained() -> Iterator[None]:
    """A queue declared before by another version (without x-max-priority, or a quorum queue)
    cannot be declared again with other arguments: RabbitMQ closes the channel with
    PRECONDITION_FAILED. Nothing is lost (the rows stay unstamped for the sweeper), but every
    publish fails until an operator acts: say what to do."""
    try:
        yield
    except amqp.exceptions.PreconditionFailed as error:
        raise QueueMismatch(
            f"RabbitMQ refused a queue declaration: {error}. Runyard declares classic durable "
            "queues with x-max-priority=9; a queue declared otherwise (by an older Runyard, or "
            "as a quorum queue) must be drained and deleted (`rabbitmqctl delete_queue NAME "
            "-p VHOST`) or moved aside; submits wait in PostgreSQL meanwhile and are published "
            "by the sweeper once the declaration succeeds"
        ) from error


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
    with _explained():
        _send_run(message, shadow, argsrepr, countdown, producer)


def _send_run(
    message: RunMessage, shadow: str, argsrepr: str, countdown: float | None, producer: Any
) -> None:
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
    (workers.redis_transport) each queue and priority then goes out as one LPUSH; on RabbitMQ
    every message goes out on one channel and the call returns once the broker confirmed them
    all (_publish_confirmed); other brokers get kombu's producer, message by message. What
    send_task repeats per message (routing, signals, the repr of the arguments) and
    Producer.publish's layers were most of the cost of publishing 10,000 (bench/schedules.py:
    about 4 s with send_task, under 0.5 s this way)."""
    groups: dict[tuple[str, int, float, float], list[RunMessage]] = {}
    for message in messages:
        key = (message.queue, message.priority, message.soft_time_limit, message.time_limit)
        groups.setdefault(key, []).append(message)
    if _AMQP:
        # A pooled connection: the handshake is paid once per process, not per batch.
        with celery_app.connection_or_acquire() as connection, _explained():
            connection.ensure_connection(max_retries=_SEND_RETRY["max_retries"])
            _publish_confirmed(connection, groups)
        return
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


class _Confirms:
    """RabbitMQ's answers to the messages of one bulk publish on a channel in confirm mode: the
    channel's delivery tags count its publishes, 1, 2, ...; an ack or nack may cover every tag
    up to its own (`multiple`); a mandatory message no queue took comes back (basic.return)
    before its ack."""

    def __init__(self) -> None:
        self.outstanding: set[int] = set()
        self.refused: list[str] = []

    def ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.outstanding = {pending for pending in self.outstanding if pending > tag}
        else:
            self.outstanding.discard(tag)

    def nack(self, tag: int, multiple: bool) -> None:
        self.refused.append(f"nacked up to {tag}" if multiple else f"nacked {tag}")
        self.ack(tag, multiple)

    def returned(self, _exchange: str, routing_key: str, *_rest: Any) -> None:
        self.refused.append(f"no queue took a message for {routing_key!r}")


class _ConfirmedPublisher:
    """A channel in confirm mode kept beside a pooled connection's own, with the queues it
    declared: a bulk publish of one message costs one round trip (the confirm), not the seven
    a channel opened, confirm-selected, declared on and closed each time cost (measured: 7 ms
    a lone submit against 2.4 ms for send_task's confirmed publish). Any error drops it: the
    next one opens afresh and declares again (a broker that lost its data lost its queues)."""

    def __init__(self, connection: Any) -> None:
        self.pid = os.getpid()
        self.channel = connection.channel()
        self.channel.confirm_select()
        self.declared: set[str] = set()
        self.sent = 0
        self.confirms = _Confirms()
        self.channel.events["basic_ack"].add(lambda *args: self.confirms.ack(*args))
        self.channel.events["basic_nack"].add(lambda *args: self.confirms.nack(*args))
        self.channel.events["basic_return"].add(lambda *args: self.confirms.returned(*args))

    def publish(self, connection: Any, groups: dict[tuple, list[RunMessage]]) -> None:
        channel, confirms = self.channel, _Confirms()
        self.confirms = confirms
        for (queue_name, priority, soft_limit, hard_limit), members in groups.items():
            queue = celery_app.amqp.queues[queue_name]
            if queue.name not in self.declared:
                queue(channel).declare()
                self.declared.add(queue.name)
            for body, headers, properties in _envelopes(queue, soft_limit, hard_limit, members):
                message = channel.prepare_message(
                    body,
                    _broker_priority(priority),
                    "application/json",
                    "utf-8",
                    headers,
                    properties,
                )
                # Not basic_publish: with confirm_publish it would wait for each message.
                channel._basic_publish(message, exchange="", routing_key=queue.name, mandatory=True)
                self.sent += 1
                confirms.outstanding.add(self.sent)
        deadline = time.monotonic() + CONFIRM_TIMEOUT_SECONDS
        while confirms.outstanding:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"RabbitMQ did not confirm {len(confirms.outstanding)} messages "
                    f"within {CONFIRM_TIMEOUT_SECONDS:.0f}s"
                )
            connection.drain_events(timeout=remaining)
        if confirms.refused:
            raise RuntimeError("RabbitMQ refused messages: " + "; ".join(confirms.refused[:5]))


# One publisher per pooled connection (py-amqp's), kept as an attribute of the connection so it
# goes with it (a mapping keyed by the connection would keep it alive: the publisher's channel
# refers to its connection).
_PUBLISHER = "_runyard_confirmed_publisher"


def _publish_confirmed(connection: Any, groups: dict[tuple, list[RunMessage]]) -> None:
    """Publish every group on the connection's confirm channel, then wait once for RabbitMQ to
    confirm them all: a confirmed persistent message is on disk in a durable queue, so the
    caller may stamp its row dispatched. One round trip for the batch, not one per message
    (py-amqp's confirm_publish waits after each). Raises when anything was refused or not
    confirmed in time: the rows stay unstamped and the sweeper publishes them again (the claim
    drops a duplicate)."""
    raw = connection.connection
    publisher = getattr(raw, _PUBLISHER, None)
    if publisher is None or publisher.pid != os.getpid() or not publisher.channel.is_open:
        publisher = _ConfirmedPublisher(connection)
        setattr(raw, _PUBLISHER, publisher)
    try:
        publisher.publish(connection, groups)
    except BaseException:
        setattr(raw, _PUBLISHER, None)
        with contextlib.suppress(Exception):
            publisher.channel.close()
        raise


def _envelopes(
    queue: Any, soft_limit: float, hard_limit: float, members: list[RunMessage]
) -> list[tuple[str, dict, dict]]:
    """(body, headers, properties) of each message: one task message, copied per id."""
    headers, properties, body = _task_message(soft_limit, hard_limit)
    delivery_mode = queue.exchange.delivery_mode or celery_app.conf.task_default_delivery_mode
    # The number on the wire, as Producer.publish sets it ("persistent" is 2).
    delivery_mode = DELIVERY_MODES.get(delivery_mode, delivery_mode)
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
# The sweeper's side of the broker and the shared token buckets, under the names callers use
# (imported last: both use the Celery app above).

from app.broker.buckets import Bucket, take_tokens  # noqa: E402
from app.broker.sweeper import (  # noqa: E402
    DATABASE_AWAY_KEY,
    LOCK_KEY,
    MARKER_KEY,
    MARKER_QUEUE,
    RECOVERY_KEY,
    BrokerError,
    BrokerWatch,
    message_ids_held,
    restore_taken,
)

__all__ = [
    "DATABASE_AWAY_KEY",
    "LOCK_KEY",
    "MARKER_KEY",
    "MARKER_QUEUE",
    "RECOVERY_KEY",
    "BrokerError",
    "BrokerWatch",
    "Bucket",
    "message_ids_held",
    "restore_taken",
    "take_tokens",
]
