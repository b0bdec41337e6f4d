"""Executions: submit, claim, finish, cancel, read, and the sweeper's recovery.

PostgreSQL is the system of record. Submit commits the row and only then publishes a message that
carries the id; a worker claims the row with one conditional UPDATE and fences every later write
with the attempt it claimed. The hot steps (submit, claim, finish) are one statement each on an
autocommit connection.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import psycopg
from jsonschema.protocols import Validator
from psycopg.types.json import Jsonb
from sqlalchemy import Connection, bindparam, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from app import jsonschemas
from app.agents.models import Agent
from app.db import db, page
from app.errors import Conflict, NotFound, ValidationFailed
from app.executions.models import LEVEL_NAMES, LEVELS, Execution, ExecutionAttempt, ExecutionLog
from app.orgs.services import Principal

log = logging.getLogger(__name__)

RUN_TASK = "runyard.run_execution"
DEFAULT_PRIORITY = 5
# Beyond the soft limit the runtime gets this long to record `timeout` before Celery kills it.
HARD_LIMIT_GRACE_SECONDS = 10
CHILD_RUNTIME_BACKSTOP_SECONDS = 5

HINTS = {
    "input_invalid": "the input does not match the agent's input_schema",
    "output_invalid": "the agent returned an output that does not match its output_schema; "
    "fix the agent or PATCH the schema (a new version)",
    "runtime_error": "the agent failed; its logs hold the traceback or the program's stderr",
    "timeout": "the execution ran past timeout_seconds; raise it or speed the agent up",
    "cancelled": "cancelled through POST /api/v1/executions/{id}/cancel",
    "lost": "the worker running the attempt stopped answering (killed, or its host lost); "
    "`lost` in retry.retry_on lets such an attempt run again",
    "memory_limit": "the agent's processes used more memory than limits.memory_mb; raise the "
    "limit (a new version) or make the agent use less",
    "cpu_limit": "the agent's processes used more CPU time than limits.cpu_seconds; raise the "
    "limit (a new version) or make the agent do less",
    "output_too_large": "the output is over limits.max_output_bytes (or RUNYARD_MAX_OUTPUT_BYTES "
    "when unset); return less, or store large results elsewhere and return a reference",
    "file_size_limit": "the agent wrote a file over RUNYARD_CHILD_MAX_FILE_MB",
    "process_limit": "the agent ran more processes at once than RUNYARD_CHILD_MAX_PROCESSES",
}


def error_body(error_type: str, message: str, hint: str | None = None) -> dict[str, str]:
    return {"type": error_type, "message": message, "hint": hint or HINTS.get(error_type, "")}


# ---------------------------------------------------------------------------------------------
# Versions as the hot path needs them: immutable, so each process caches them for good.


@dataclass(frozen=True)
class VersionSpec:
    id: uuid.UUID
    agent_id: uuid.UUID
    agent_name: str
    version: str
    runtime: dict[str, Any]
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    timeout_seconds: int
    retry: dict[str, Any]
    limits: dict[str, Any]
    queue: str
    config: dict[str, Any]

    @property
    def max_attempts(self) -> int:
        return 1 + int(self.retry.get("max_retries", 0))

    @property
    def soft_time_limit(self) -> float:
        """Celery's soft limit. Runtimes with a child process enforce timeout_seconds themselves
        and kill it; Celery's limit is then only a backstop, set a little later."""
        if self.runtime["type"] == "python":
            return self.timeout_seconds
        return self.timeout_seconds + CHILD_RUNTIME_BACKSTOP_SECONDS

    # Built once per cached spec, not once per execution.
    @cached_property
    def input_validator(self) -> Validator:
        return jsonschemas.validator_for(self.input_schema)

    @cached_property
    def output_validator(self) -> Validator:
        return jsonschemas.validator_for(self.output_schema)


_SPEC_SQL = text(
    """
    SELECT v.id, v.agent_id, a.name AS agent_name, v.version, v.runtime, v.input_schema,
           v.output_schema, v.timeout_seconds, v.retry, v.limits, v.queue, v.config
    FROM agent_versions v JOIN agents a ON a.id = v.agent_id
    WHERE v.id = :id
    """
)


class SpecCache:
    def __init__(self, max_entries: int = 1024) -> None:
        self._entries: OrderedDict[uuid.UUID, VersionSpec] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def get(self, conn: Connection, version_id: uuid.UUID) -> VersionSpec:
        spec = self._entries.get(version_id)
        if spec is None:
            row = conn.execute(_SPEC_SQL, {"id": version_id}).mappings().one()
            spec = VersionSpec(**row)
            with self._lock:
                self._entries[version_id] = spec
                if len(self._entries) > self._max:
                    self._entries.popitem(last=False)
        return spec


specs = SpecCache()


# ---------------------------------------------------------------------------------------------
# Submit


@dataclass(frozen=True)
class Target:
    agent_id: uuid.UUID
    version_id: uuid.UUID
    pinned: bool


class TargetCache:
    """(org, agent ref, version) -> ids. May be stale: the INSERT re-checks what it relies on."""

    def __init__(self, ttl_seconds: float = 30.0) -> None:
        self.ttl_seconds = ttl_seconds
        self._entries: dict[tuple, tuple[float, Target]] = {}

    def get(self, key: tuple) -> Target | None:
        entry = self._entries.get(key)
        if entry and entry[0] > time.monotonic():
            return entry[1]
        return None

    def put(self, key: tuple, target: Target) -> None:
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self.ttl_seconds, target)

    def forget(self, key: tuple) -> None:
        self._entries.pop(key, None)


targets = TargetCache()

_AGENT_SQL = (
    "SELECT id, name, current_version_id, archived_at FROM agents WHERE org_id = :org_id AND "
)


def _lookup_target(conn: Connection, principal: Principal, ref: str, version: str | None) -> Target:
    try:
        params = {"org_id": principal.org_id, "ref": uuid.UUID(ref)}
        row = conn.execute(text(_AGENT_SQL + "id = :ref"), params).mappings().first()
    except ValueError:
        params = {"org_id": principal.org_id, "ref": ref}
        row = conn.execute(text(_AGENT_SQL + "name = :ref"), params).mappings().first()
    if row is None:
        raise NotFound(f"no agent {ref!r}", hint="GET /api/v1/agents lists your agents")
    if row["archived_at"] is not None:
        raise Conflict(
            f"agent {row['name']!r} is archived and takes no new executions",
            hint="create a new agent, or run another one",
        )
    if version is None:
        return Target(row["id"], row["current_version_id"], pinned=False)
    version_id = conn.execute(
        text("SELECT id FROM agent_versions WHERE agent_id = :agent_id AND version = :version"),
        {"agent_id": row["id"], "version": version},
    ).scalar()
    if version_id is None:
        raise NotFound(
            f"agent {row['name']!r} has no version {version!r}",
            hint=f"GET /api/v1/agents/{row['name']}/versions lists them",
        )
    return Target(row["id"], version_id, pinned=True)


# One statement: insert only if the agent is still live and (unless pinned) the version we
# validated against is still its current one. A stale cache shows up as no row, never as a
# wrong row.
_INSERT_SQL = """
    INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version, status,
                            priority, input, attempt, max_attempts)
    SELECT %(id)s, a.org_id, a.id, %(version_id)s, a.name, %(version)s, 'queued', %(priority)s,
           %(input)s, 0, %(max_attempts)s
    FROM agents a
    WHERE a.id = %(agent_id)s AND a.org_id = %(org_id)s AND a.archived_at IS NULL
      AND (%(pinned)s OR a.current_version_id = %(version_id)s)
    RETURNING queued_at
"""


def _driver(conn: Connection) -> psycopg.Connection:
    """The psycopg connection under an SQLAlchemy one. The three hot statements (insert, claim,
    finish) run on it directly: SQLAlchemy's per-statement work was about a third of their CPU
    (measured with cProfile on the worker's run loop)."""
    return conn.connection.driver_connection


def submit(
    principal: Principal,
    ref: str,
    payload: dict[str, Any],
    *,
    version: str | None = None,
    priority: int = DEFAULT_PRIORITY,
) -> dict[str, Any]:
    principal.require("executions:submit")
    key = (principal.org_id, ref, version)
    execution_id = uuid.uuid4()
    with db.hot() as conn:
        for fresh in (False, True):
            target = None if fresh else targets.get(key)
            if target is None:
                target = _lookup_target(conn, principal, ref, version)
                targets.put(key, target)
            spec = specs.get(conn, target.version_id)
            errors = jsonschemas.instance_errors(spec.input_validator, payload, "/input")
            if errors:
                raise ValidationFailed(
                    "the input does not match the agent's input_schema",
                    errors=errors,
                    hint=f"GET /api/v1/agents/{spec.agent_name} shows the input_schema",
                )
            try:
                row = (
                    _driver(conn)
                    .execute(
                        _INSERT_SQL,
                        {
                            "id": execution_id,
                            "org_id": principal.org_id,
                            "agent_id": target.agent_id,
                            "version_id": spec.id,
                            "version": spec.version,
                            "priority": priority,
                            "input": Jsonb(payload),
                            "max_attempts": spec.max_attempts,
                            "pinned": target.pinned,
                        },
                    )
                    .fetchone()
                )
            except psycopg.errors.UntranslatableCharacter as exc:
                raise ValidationFailed(
                    "the input holds a NUL character (\\u0000), which cannot be stored",
                    errors={"/input": ["contains \\u0000"]},
                    hint="remove or escape the NUL characters",
                ) from exc
            if row is not None:
                queued_at = row[0]
                break
            targets.forget(key)
        else:
            raise Conflict("the agent changed while submitting", hint="submit again")
    # Committed (autocommit) before publishing: a worker never sees an id the database lacks.
    # Inside a keyed request's transaction the commit comes later, and so does the publish.
    db.after_commit(dispatcher.submit, execution_id, spec, priority)
    return {
        "id": execution_id,
        "agent_id": target.agent_id,
        "agent_name": spec.agent_name,
        "agent_version": spec.version,
        "status": "queued",
        "priority": priority,
        "input": payload,
        "output": None,
        "error": None,
        "attempts": 0,
        "queued_at": queued_at,
        "started_at": None,
        "finished_at": None,
        "duration_ms": None,
        "resource_usage": None,
        "chain_execution_id": None,
    }


def _send(
    execution_id: uuid.UUID,
    spec: VersionSpec,
    priority: int,
    *,
    countdown: float | None = None,
    producer=None,
) -> None:
    from workers import app as celery_app

    celery_app.send_task(
        RUN_TASK,
        args=[str(execution_id)],
        task_id=str(execution_id),
        queue=spec.queue,
        # Redis serves the lowest priority number first; the API's 9 is the most urgent.
        priority=9 - priority,
        countdown=countdown,
        # Results live in PostgreSQL: no result channel to subscribe to per message.
        ignore_result=True,
        soft_time_limit=spec.soft_time_limit,
        time_limit=spec.soft_time_limit + HARD_LIMIT_GRACE_SECONDS,
        producer=producer,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
    )


def _stamp(ids: list[uuid.UUID]) -> None:
    with db.hot() as conn:
        conn.execute(
            # Rows a worker claimed meanwhile carry the stamp already: skip the write.
            text(
                "UPDATE executions SET dispatched_at = now() "
                "WHERE id = ANY(:ids) AND dispatched_at IS NULL"
            ),
            {"ids": ids},
        )


def publish(
    execution_id: uuid.UUID, spec: VersionSpec, priority: int, countdown: float | None = None
) -> bool:
    """Send one message now and stamp it (sweeper and retries); on a broker outage leave it to
    the sweeper: the row is safe."""
    try:
        _send(execution_id, spec, priority, countdown=countdown)
    except Exception:  # a broker outage must not lose the committed row, only delay it
        log.warning(
            "publish of execution %s failed; the sweeper will retry", execution_id, exc_info=True
        )
        return False
    _stamp([execution_id])
    return True


@dataclass(frozen=True)
class Dispatch:
    execution_id: uuid.UUID
    spec: VersionSpec
    priority: int


def publish_batch(batch: list[Dispatch]) -> list[uuid.UUID]:
    """Publish messages through one Redis pipeline; the ids sent, or none on a broker outage
    (the rows stay unstamped and the sweeper tries again)."""
    from workers import app as celery_app

    if not batch:
        return []
    try:
        with celery_app.producer_or_acquire() as producer, producer.batch():
            for item in batch:
                _send(item.execution_id, item.spec, item.priority, producer=producer)
    except Exception:  # a broker outage: the sweeper publishes these rows later
        log.warning(
            "publishing %d executions failed; the sweeper will retry", len(batch), exc_info=True
        )
        return []
    return [item.execution_id for item in batch]


class Dispatcher:
    """Publishes submitted executions from a background thread, in batches, and stamps
    `dispatched_at` once they are out.

    A submit answers as soon as its row is committed, without waiting on the broker. Batches
    grow by themselves under load (while one is published the next accumulates) and each goes
    to Redis as one pipeline. What sits here when the process dies is lost from memory only:
    its rows are committed and unstamped, so the sweeper publishes them after
    RUNYARD_DISPATCH_GRACE_SECONDS. Stamps are written once a second; a row claimed before its
    stamp already carries one and is skipped.
    """

    STAMP_INTERVAL_SECONDS = 1.0

    def __init__(self) -> None:
        self._reset()
        self._drain_at_exit = False
        # gunicorn and Celery fork: a child starts empty, with a lock nobody holds.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._pending: list[Dispatch] = []
        self._published: list[uuid.UUID] = []
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, execution_id: uuid.UUID, spec: VersionSpec, priority: int) -> None:
        if db.bound_for_tests:
            # Tests run inside one transaction on one connection; no second thread may touch it.
            publish(execution_id, spec, priority)
            return
        with self._wakeup:
            self._pending.append(Dispatch(execution_id, spec, priority))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
                self._thread.start()
                if not self._drain_at_exit:
                    self._drain_at_exit = True
                    atexit.register(self.drain)
            self._wakeup.notify()

    def _run(self) -> None:
        last_stamp = time.monotonic()
        while True:
            with self._wakeup:
                if not self._pending:
                    self._wakeup.wait(timeout=self.STAMP_INTERVAL_SECONDS)
                batch, self._pending = self._pending, []
            if batch:
                self._published.extend(publish_batch(batch))
            if self._published and time.monotonic() - last_stamp >= self.STAMP_INTERVAL_SECONDS:
                last_stamp = time.monotonic()
                stamped, self._published = self._published, []
                try:
                    _stamp(stamped)
                except Exception:
                    log.warning(
                        "could not stamp %d executions as dispatched", len(stamped), exc_info=True
                    )

    def drain(self) -> None:
        """At a clean exit, publish and stamp what is still waiting, rather than leave it to
        the sweeper's grace period."""
        with self._wakeup:
            batch, self._pending = self._pending, []
        published = publish_batch(batch) if batch else []
        stamped, self._published = self._published + published, []
        if stamped:
            with contextlib.suppress(Exception):
                _stamp(stamped)


dispatcher = Dispatcher()


# ---------------------------------------------------------------------------------------------
# Many at once, inside a caller's transaction (schedules and webhook triggers)


@dataclass(frozen=True)
class NewExecution:
    id: uuid.UUID
    org_id: uuid.UUID
    spec: VersionSpec
    input: dict[str, Any]
    priority: int = DEFAULT_PRIORITY


# One JSON document for all rows: PostgreSQL unpacks it in C, where binding one array per column
# cost more in the driver than the INSERT itself (10,000 rows, bench/schedules.py).
_INSERT_MANY_SQL = """
    INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version, status,
                            priority, input, attempt, max_attempts)
    SELECT r.id, r.org_id, r.agent_id, r.version_id, r.agent_name, r.agent_version, 'queued',
           r.priority, r.input, 0, r.max_attempts
    FROM json_to_recordset(%(rows)s::json)
         AS r(id uuid, org_id uuid, agent_id uuid, version_id uuid, agent_name text,
              agent_version text, priority smallint, input jsonb, max_attempts int)
"""


def insert_queued(conn: Connection, rows: list[NewExecution]) -> list[Dispatch]:
    """Insert queued executions with one statement, in the caller's transaction (no commit
    here). The caller checked the inputs; once it has committed, it hands the returned
    dispatches to `publish_committed`."""
    if not rows:
        return []
    document = json.dumps(
        [
            {
                "id": str(row.id),
                "org_id": str(row.org_id),
                "agent_id": str(row.spec.agent_id),
                "version_id": str(row.spec.id),
                "agent_name": row.spec.agent_name,
                "agent_version": row.spec.version,
                "priority": row.priority,
                "input": row.input,
                "max_attempts": row.spec.max_attempts,
            }
            for row in rows
        ]
    )
    _driver(conn).execute(_INSERT_MANY_SQL, {"rows": document})
    return [Dispatch(row.id, row.spec, row.priority) for row in rows]


def publish_many(batch: list[Dispatch]) -> list[uuid.UUID]:
    """`publish_batch` for thousands at once (a minute's schedules): the same messages as
    `_send`, built faster. Celery builds the task message once per version and priority and
    each execution gets a copy carrying its own id. On Redis (workers.redis_transport) each
    group then goes out as one LPUSH; other brokers get kombu's producer, message by message.
    What send_task repeats per message (routing, signals, the repr of the arguments) and
    Producer.publish's layers were most of the cost of publishing 10,000 (bench/schedules.py:
    about 4 s with send_task, under 0.5 s this way)."""
    from workers import app as celery_app

    if not batch:
        return []
    groups: dict[tuple[uuid.UUID, int], list[Dispatch]] = {}
    for item in batch:
        groups.setdefault((item.spec.id, item.priority), []).append(item)
    amqp = celery_app.amqp
    try:
        with celery_app.producer_or_acquire() as producer, producer.batch():
            for items in groups.values():
                spec, priority = items[0].spec, items[0].priority
                queue = amqp.queues[spec.queue]
                producer.maybe_declare(queue)
                headers, properties, body, _sent_event = amqp.as_task_v2(
                    "",
                    RUN_TASK,
                    args=[""],
                    kwargs={},
                    ignore_result=True,
                    soft_time_limit=spec.soft_time_limit,
                    time_limit=spec.soft_time_limit + HARD_LIMIT_GRACE_SECONDS,
                )
                delivery_mode = (
                    queue.exchange.delivery_mode or celery_app.conf.task_default_delivery_mode
                )
                messages = []
                for item in items:
                    task_id = str(item.execution_id)
                    messages.append(
                        (
                            json.dumps([[task_id], body[1], body[2]]),
                            {
                                **headers,
                                "id": task_id,
                                "root_id": task_id,
                                "argsrepr": f"['{task_id}']",
                            },
                            {
                                "correlation_id": task_id,
                                "reply_to": properties["reply_to"],
                                "delivery_mode": delivery_mode,
                            },
                        )
                    )
                # Redis serves the lowest priority number first; the API's 9 is the most urgent.
                bulk = getattr(producer.channel, "publish_bulk", None)
                if bulk is not None:  # workers.redis_transport: one LPUSH per group
                    bulk(queue.name, 9 - priority, messages)
                    continue
                for message_body, message_headers, message_properties in messages:
                    producer.publish(
                        message_body,
                        # A direct exchange: routed by queue name, as send_task does.
                        exchange="",
                        routing_key=queue.name,
                        content_type="application/json",
                        content_encoding="utf-8",
                        headers=message_headers,
                        priority=9 - priority,
                        **message_properties,
                    )
    except Exception:  # a broker outage: the sweeper publishes these rows later
        log.warning(
            "publishing %d executions failed; the sweeper will retry", len(batch), exc_info=True
        )
        return []
    return [item.execution_id for item in batch]


def stamp_dispatched(execution_ids: list[uuid.UUID]) -> None:
    """Mark published rows, so the sweeper does not publish them again (a caller that stamps
    later than it publishes, as the Dispatcher does)."""
    if execution_ids:
        _stamp(execution_ids)


def publish_committed(batch: list[Dispatch]) -> list[uuid.UUID]:
    """Publish committed rows now, in bulk, and stamp them; on a broker outage nothing is
    stamped and the sweeper publishes them later."""
    sent = publish_many(batch)
    if sent:
        _stamp(sent)
    return sent


def request_cancel(
    conn: Connection, org_id: uuid.UUID, execution_ids: list[uuid.UUID], message: str
) -> None:
    """Cancel from inside a caller's transaction (a schedule's overlap policy cancel_other):
    the same row changes as `cancel`, for executions that have not finished."""
    for execution_id in execution_ids:
        params = {
            "id": execution_id,
            "org_id": org_id,
            "error": error_body("cancelled", message),
        }
        conn.execute(_CANCEL, params)


# ---------------------------------------------------------------------------------------------
# Claim and finish (the worker side)


@dataclass(frozen=True)
class Claim:
    execution_id: uuid.UUID
    attempt: int
    version_id: uuid.UUID
    input: dict[str, Any]
    priority: int
    last_seq: int
    # Set for a chain step: the runner then tells the chain when the step settles.
    chain_execution_id: uuid.UUID | None = None


_CLAIM_SQL = """
    UPDATE executions
    SET status = 'running', attempt = attempt + 1, started_at = now(), worker = %(worker)s,
        resource_usage = NULL,
        dispatched_at = coalesce(dispatched_at, now()),
        lease_until = now() + make_interval(secs => %(lease)s)
    WHERE id = %(id)s AND status = 'queued'
    RETURNING attempt, version_id, input, priority,
              (SELECT coalesce(max(seq), 0) FROM execution_logs WHERE execution_id = %(id)s),
              chain_execution_id
"""


def claim(
    conn: Connection, execution_id: uuid.UUID, worker: str, lease_seconds: float
) -> Claim | None:
    """Take a queued execution. None means the message is a duplicate or stale: drop it.

    The lease is short (RUNYARD_LEASE_SECONDS) and the worker renews it while the attempt runs
    (`renew_leases`); once it runs out the sweeper takes the execution back."""
    row = (
        _driver(conn)
        .execute(_CLAIM_SQL, {"id": execution_id, "worker": worker, "lease": lease_seconds})
        .fetchone()
    )
    return None if row is None else Claim(execution_id, *row)


# One statement for every attempt a worker process holds, fenced by the attempt like a finish:
# an attempt the sweeper took back (or that ended) is not renewed and does not come back.
_RENEW_LEASES_SQL = """
    UPDATE executions e
    SET lease_until = now() + make_interval(secs => %(lease)s)
    FROM unnest(%(ids)s::uuid[], %(attempts)s::int[]) AS held(id, attempt)
    WHERE e.id = held.id AND e.attempt = held.attempt AND e.status = 'running'
    RETURNING e.id
"""


def renew_leases(conn: Connection, held: list[Claim], lease_seconds: float) -> set[uuid.UUID]:
    """Extend the leases of the attempts a worker runs; the ids whose attempt it still owns."""
    if not held:
        return set()
    rows = (
        _driver(conn)
        .execute(
            _RENEW_LEASES_SQL,
            {
                "ids": [claimed.execution_id for claimed in held],
                "attempts": [claimed.attempt for claimed in held],
                "lease": lease_seconds,
            },
        )
        .fetchall()
    )
    return {row[0] for row in rows}


# A statement that ends an attempt the execution goes on from (a retry, a lost worker) records
# it in execution_attempts in the same round trip. The final attempt is the execution row
# itself, so the common finish stays one UPDATE (see `attempts`).
RECORD_ATTEMPT = """
    INSERT INTO execution_attempts
        (execution_id, attempt, status, error, worker, started_at, finished_at, resource_usage)
    SELECT id, attempt, {status}, error, worker, started_at, now(), resource_usage FROM ended
    ON CONFLICT (execution_id, attempt) DO UPDATE
    SET status = excluded.status, error = excluded.error, worker = excluded.worker,
        started_at = excluded.started_at, finished_at = excluded.finished_at,
        resource_usage = excluded.resource_usage
"""

_FINISH_SQL = """
    UPDATE executions
    SET status = %(status)s, output = %(output)s, error = %(error)s, resource_usage = %(usage)s,
        finished_at = now(), lease_until = NULL
    WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
"""


def _jsonb(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)


def finish(
    conn: Connection,
    claimed: Claim,
    *,
    status: str,
    output: dict[str, Any] | None,
    error: dict[str, Any] | None,
    usage: dict[str, Any],
) -> bool:
    """Record the outcome, fenced by the attempt: False means a newer attempt owns the row."""
    cursor = _driver(conn).execute(
        _FINISH_SQL,
        {
            "id": claimed.execution_id,
            "attempt": claimed.attempt,
            "status": status,
            "output": _jsonb(output),
            "error": _jsonb(error),
            "usage": Jsonb(usage),
        },
    )
    return cursor.rowcount == 1


_RETRY_SQL = text(
    """
    WITH ended AS (
        UPDATE executions
        SET status = 'queued', error = :error, resource_usage = :usage, lease_until = NULL,
            dispatched_at = NULL
        WHERE id = :id AND attempt = :attempt AND status = 'running'
          AND cancel_requested_at IS NULL
        RETURNING id, attempt, error, worker, started_at, resource_usage
    )
    """
    + RECORD_ATTEMPT.format(status=":attempt_status")
).bindparams(bindparam("error", type_=JSONB), bindparam("usage", type_=JSONB))


def requeue_for_retry(
    conn: Connection,
    claimed: Claim,
    *,
    attempt_status: str,
    error: dict[str, Any],
    usage: dict[str, Any],
) -> bool:
    """Put a failed attempt back in the queue; the caller publishes it with its backoff."""
    result = conn.execute(
        _RETRY_SQL,
        {
            "id": claimed.execution_id,
            "attempt": claimed.attempt,
            "attempt_status": attempt_status,
            "error": error,
            "usage": usage,
        },
    )
    return result.rowcount == 1


_LOG_INSERT = text(
    """
    INSERT INTO execution_logs (execution_id, seq, attempt, ts, level, message, fields)
    SELECT :execution_id, :seq, :attempt, :ts, :level, :message, :fields
    -- Fenced like every write after the claim: a stale attempt's lines are dropped.
    WHERE EXISTS (SELECT 1 FROM executions WHERE id = :execution_id AND attempt = :attempt)
    ON CONFLICT DO NOTHING
    """
).bindparams(bindparam("fields", type_=JSONB))


def write_logs(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn.execute(_LOG_INSERT, rows)


def cancel_requested(conn: Connection, execution_id: uuid.UUID) -> bool:
    return bool(
        conn.execute(
            text("SELECT cancel_requested_at IS NOT NULL FROM executions WHERE id = :id"),
            {"id": execution_id},
        ).scalar()
    )


# ---------------------------------------------------------------------------------------------
# Reading and cancelling (the API side)


def present(row: Mapping[str, Any] | Execution) -> dict[str, Any]:
    get = row.__getitem__ if isinstance(row, Mapping) else lambda name: getattr(row, name)
    started, finished = get("started_at"), get("finished_at")
    return {
        "id": get("id"),
        "agent_id": get("agent_id"),
        "agent_name": get("agent_name"),
        "agent_version": get("agent_version"),
        "status": get("status"),
        "priority": get("priority"),
        "input": get("input"),
        "output": get("output"),
        "error": get("error"),
        "attempts": get("attempt"),
        "queued_at": get("queued_at"),
        "started_at": started,
        "finished_at": finished,
        "duration_ms": (
            round((finished - started).total_seconds() * 1000) if started and finished else None
        ),
        "resource_usage": get("resource_usage"),
        "chain_execution_id": get("chain_execution_id"),
    }


def _parse_id(execution_id: str | uuid.UUID) -> uuid.UUID:
    try:
        return execution_id if isinstance(execution_id, uuid.UUID) else uuid.UUID(execution_id)
    except ValueError as exc:
        raise NotFound(f"no execution {execution_id!r}") from exc


def get(session: Session, principal: Principal, execution_id: str | uuid.UUID) -> Execution:
    found = session.scalar(
        select(Execution).where(
            Execution.id == _parse_id(execution_id), Execution.org_id == principal.org_id
        )
    )
    if found is None:
        raise NotFound(f"no execution {execution_id}", hint="GET /api/v1/executions lists them")
    return found


def list_executions(
    session: Session,
    principal: Principal,
    *,
    agent: str | None,
    status: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    offset: int,
    limit: int,
    chain_execution_id: uuid.UUID | None = None,
) -> tuple[list[Execution], int]:
    query = select(Execution).where(Execution.org_id == principal.org_id)
    if chain_execution_id:
        query = query.where(Execution.chain_execution_id == chain_execution_id)
    if agent:
        try:
            query = query.where(Execution.agent_id == uuid.UUID(agent))
        except ValueError:
            agent_ids = select(Agent.id).where(
                Agent.org_id == principal.org_id, Agent.name == agent
            )
            query = query.where(Execution.agent_id.in_(agent_ids))
    if status:
        query = query.where(Execution.status == status)
    if since:
        query = query.where(Execution.queued_at >= since)
    if until:
        query = query.where(Execution.queued_at < until)
    return page(
        session, query, Execution.queued_at.desc(), Execution.id.desc(), offset=offset, limit=limit
    )


def logs(
    session: Session,
    principal: Principal,
    execution_id: str,
    *,
    level: str | None,
    q: str | None,
    after_seq: int | None,
    limit: int,
) -> list[dict[str, Any]]:
    execution = get(session, principal, execution_id)
    query = select(ExecutionLog).where(ExecutionLog.execution_id == execution.id)
    if level:
        query = query.where(ExecutionLog.level >= LEVELS[level])
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(ExecutionLog.message.ilike(f"%{escaped}%", escape="\\"))
    if after_seq is not None:
        query = query.where(ExecutionLog.seq > after_seq)
    rows = session.scalars(query.order_by(ExecutionLog.seq).limit(limit)).all()
    return [
        {
            "seq": r.seq,
            "ts": r.ts,
            "level": LEVEL_NAMES.get(r.level, str(r.level)),
            "message": r.message,
            "fields": r.fields or {},
            "attempt": r.attempt,
        }
        for r in rows
    ]


def attempts(session: Session, principal: Principal, execution_id: str) -> list[dict[str, Any]]:
    """Every attempt, oldest first: those the execution went on from, as recorded, then the
    latest one (running or final), which is the execution row itself."""
    execution = get(session, principal, execution_id)
    rows = session.scalars(
        select(ExecutionAttempt)
        .where(ExecutionAttempt.execution_id == execution.id)
        .order_by(ExecutionAttempt.attempt)
    ).all()
    listed = [
        {
            "attempt": row.attempt,
            "status": row.status,
            "error": row.error,
            "worker": row.worker,
            "started_at": row.started_at,
            "finished_at": row.finished_at,
            "resource_usage": row.resource_usage,
        }
        for row in rows
    ]
    recorded = {row.attempt for row in rows}
    if execution.attempt >= 1 and execution.attempt not in recorded:
        listed.append(
            {
                "attempt": execution.attempt,
                "status": execution.status,
                "error": execution.error,
                "worker": execution.worker,
                "started_at": execution.started_at,
                "finished_at": execution.finished_at,
                "resource_usage": execution.resource_usage,
            }
        )
    return listed


# One statement for both states: a retry or the sweeper may put a running execution back to
# `queued` at any moment, and two statements (queued, then running) could both miss it and
# answer 409 while the retry goes on. A queued execution ends here; a running one is asked to
# stop (its worker records the end). SET reads the row as it was; RETURNING, as it is now.
_CANCEL = text(
    """
    UPDATE executions
    SET status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
        cancel_requested_at = CASE
            WHEN status = 'queued' THEN now() ELSE coalesce(cancel_requested_at, now()) END,
        finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
        lease_until = CASE WHEN status = 'queued' THEN NULL ELSE lease_until END,
        error = CASE WHEN status = 'queued' THEN :error ELSE error END
    WHERE id = :id AND org_id = :org_id AND status IN ('queued', 'running')
    RETURNING id, chain_execution_id, status = 'cancelled' AS ended
    """
).bindparams(bindparam("error", type_=JSONB))


def cancel(
    session: Session,
    principal: Principal,
    execution_id: str,
    *,
    reason: str = "cancelled before it started",
) -> Execution:
    """Cancel is a row change, so it holds across restarts: a queued execution's claim then
    finds nothing to take (the message is dropped), and a running one's worker sees the request
    within CANCEL_CHECK_SECONDS and stops it (workers/runtimes/child.py, workers/watchdog.py).

    No Celery revoke is sent: it would add nothing the claim does not already guarantee, and
    its broadcast retries without bound while the broker is away, which would hang the cancel."""
    principal.require("executions:cancel")
    params = {
        "id": _parse_id(execution_id),
        "org_id": principal.org_id,
        "error": error_body("cancelled", reason),
    }
    with db.hot() as conn:
        done = conn.execute(_CANCEL, params).first()
    if done is not None and done.ended and done.chain_execution_id is not None:
        # No worker records this step's end: its chain moves on from here. (A running step's
        # worker records the cancel and moves the chain on itself.)
        move_chains_on([done.chain_execution_id])
    execution = get(session, principal, execution_id)
    if done is None:
        raise Conflict(
            f"execution {execution.id} has finished ({execution.status}); nothing to cancel",
            hint=f"GET /api/v1/executions/{execution.id} shows how it ended",
        )
    session.refresh(execution)
    return execution


def move_chains_on(chain_execution_ids: list[uuid.UUID]) -> None:
    """Let the chains of steps ended outside a worker move on now, not at the next resume
    check. Imported here: chains build on executions, not the other way round."""
    if not chain_execution_ids:
        return
    from app.chains.services import reconcile

    for chain_execution_id in dict.fromkeys(chain_execution_ids):
        try:
            reconcile(chain_execution_id, in_canvas=False)
        except Exception:
            # The step's end is recorded; the resume check moves the chain on later.
            log.warning("moving chain execution %s on failed", chain_execution_id, exc_info=True)
