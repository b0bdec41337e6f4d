"""Live workers, from Celery's remote control (inspect), cached briefly in each API process.

Workers run with task events off (they cost CPU on every execution), so there are no event
heartbeats to read. The remote control works without events: a broadcast on the broker's pidbox
that every worker answers from its main process. One snapshot asks three questions at once
(`active_queues`, `stats`, `active`), each ending after INSPECT_TIMEOUT_SECONDS without a new
reply; a worker that answers none of them in time is not listed. A snapshot serves every request
of this process for CACHE_SECONDS; while one request refreshes it, the others get the previous
snapshot, so at most one request per process and period waits on the broker.

Workers are shared by every organization: a snapshot holds names, queues and counts, never an
execution id or anything else of an organization.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app import broker
from app.db import utcnow
from app.errors import Unavailable
from app.orgs.services import Principal

INSPECT_TIMEOUT_SECONDS = 1.0
CACHE_SECONDS = 3.0
QUESTIONS = ("active_queues", "stats", "active")


@dataclass(frozen=True)
class Worker:
    name: str
    queues: list[str]
    concurrency: int | None
    active_executions: int
    last_heartbeat: dt.datetime


# question -> {worker name: its reply}, and worker name -> when its last reply arrived.
Replies = dict[str, dict[str, Any]]
Fetch = Callable[[], tuple[Replies, dict[str, dt.datetime]]]


def ask_workers(timeout: float = INSPECT_TIMEOUT_SECONDS) -> tuple[Replies, dict[str, dt.datetime]]:
    """Broadcast the three inspect questions in parallel and collect the replies."""
    answered_at: dict[str, dt.datetime] = {}

    def note(reply: dict[str, Any]) -> None:
        for name in reply:
            answered_at[name] = utcnow()

    try:
        replies = broker.inspect_workers(QUESTIONS, timeout, note)
    except Exception as exc:  # kombu raises the transport's own connection errors
        raise Unavailable(
            "the broker cannot be reached to ask the workers",
            hint="check REDIS_URL / RUNYARD_BROKER_URL; GET /readyz tells more",
        ) from exc
    return replies, answered_at


def workers_from(replies: Replies, answered_at: dict[str, dt.datetime]) -> list[Worker]:
    names = sorted(set().union(*(replies.get(question, {}) for question in QUESTIONS)))
    found = []
    for name in names:
        queues = replies.get("active_queues", {}).get(name) or []
        stats = replies.get("stats", {}).get(name) or {}
        active = replies.get("active", {}).get(name) or []
        concurrency = (stats.get("pool") or {}).get("max-concurrency")
        found.append(
            Worker(
                name=name,
                queues=sorted(queue["name"] for queue in queues if isinstance(queue, dict)),
                concurrency=concurrency if isinstance(concurrency, int) else None,
                active_executions=sum(
                    1
                    for task in active
                    # "name" is the message's shadow name (app/broker), "type" the task.
                    if isinstance(task, dict) and task.get("type") == broker.RUN_TASK
                ),
                last_heartbeat=answered_at.get(name) or utcnow(),
            )
        )
    return found


class FleetCache:
    """The last snapshot of the fleet, refreshed by one caller at a time once it is stale."""

    def __init__(self, fetch: Fetch, seconds: float) -> None:
        self._fetch = fetch
        self._seconds = seconds
        self._refresh = threading.Lock()
        self._snapshot: list[Worker] | None = None
        self._taken = 0.0

    def _fresh(self) -> bool:
        return self._snapshot is not None and time.monotonic() - self._taken < self._seconds

    def workers(self) -> list[Worker]:
        if self._fresh():
            return self._snapshot
        # Only the first snapshot is worth waiting for; later, a stale one beats a wait.
        if not self._refresh.acquire(blocking=self._snapshot is None):
            return self._snapshot
        try:
            if not self._fresh():
                self._snapshot = workers_from(*self._fetch())
                self._taken = time.monotonic()
            return self._snapshot
        finally:
            self._refresh.release()


_fleet = FleetCache(ask_workers, CACHE_SECONDS)


def list_workers(principal: Principal, *, offset: int, limit: int) -> tuple[list[Worker], int]:
    principal.require("read")
    workers = _fleet.workers()
    return workers[offset : offset + limit], len(workers)
