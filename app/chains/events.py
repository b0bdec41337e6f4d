"""Live events of a chain execution (Server-Sent Events): `step` on every change of a step,
`compensation` on every change of a compensation, then `end`.

A chain's state is spread over its step executions, so rather than a NOTIFY from every
statement that moves a chain (its steps' claims and finishes, the chain's own progress, the
sweeper), the process's event listener (app/executions/events.py) polls: once a second, ONE
query reads a signature of every chain execution this process streams (its status and each
step execution's status and attempt), and wakes the streams whose signature changed. 200 open
chain streams cost one query a second, and a step change shows within about a second.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from sqlalchemy import select

from app.chains import services
from app.chains.models import ACTIVE_CHAIN_STATUSES, ChainExecution
from app.chains.schemas import ChainExecutionSchema, ChainStepSchema
from app.config import current_config
from app.db import db
from app.executions.events import KEEPALIVE, Watcher, hub, sse, waited

CHAIN = "chain"
POLL_SECONDS = 1.0

_SIGNATURES_SQL = """
    SELECT c.id, c.status,
           (SELECT string_agg(e.id::text || ':' || e.status || ':' || e.attempt, ','
                              ORDER BY e.id)
            FROM executions e WHERE e.chain_execution_id = c.id)
    FROM chain_executions c WHERE c.id = ANY(%s)
"""


def _signatures(pg: psycopg.Connection, ids: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
    return {row[0]: row[1:] for row in pg.execute(_SIGNATURES_SQL, (ids,))}


hub.add_poll(CHAIN, POLL_SECONDS, _signatures)


def chain_events(
    org_id: uuid.UUID, chain_execution_id: uuid.UUID
) -> Callable[[Watcher], Iterator[str]]:
    keepalive = current_config().stream_keepalive_seconds
    step_schema, chain_schema = ChainStepSchema(), ChainExecutionSchema()

    def produce(watcher: Watcher) -> Iterator[str]:
        shown: dict[tuple[str, str, int], Any] = {}
        last_sent = time.monotonic()
        while True:
            body = _read(org_id, chain_execution_id)
            if body is None:
                return  # deleted while watched
            sent = False
            for event, entries in (
                ("step", body["steps"]),
                ("compensation", body["compensations"]),
            ):
                for entry in entries:
                    dumped = step_schema.dump(entry)
                    key = (event, entry["name"], entry["stage"])
                    if shown.get(key) != dumped:
                        shown[key], sent = dumped, True
                        yield sse(event, dumped)
            if body["status"] not in ACTIVE_CHAIN_STATUSES:
                yield sse("end", chain_schema.dump(body))
                return
            if sent:
                last_sent = time.monotonic()
            woken, last_sent = waited(watcher, keepalive, last_sent)
            if not woken:
                yield KEEPALIVE

    return produce


def _read(org_id: uuid.UUID, chain_execution_id: uuid.UUID) -> dict[str, Any] | None:
    """The chain execution as GET shows it, on one short checkout."""
    with db.session() as session:
        execution = session.scalar(
            select(ChainExecution).where(
                ChainExecution.id == chain_execution_id, ChainExecution.org_id == org_id
            )
        )
        return None if execution is None else services.present(session, execution)
