"""Versions as the hot path needs them, cached per process for good: a version never changes once
written. Agent versions (`specs`) here; chain plans use the same cache (app/chains/plans.py)."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from sqlalchemy import Connection, text

from app.executions.spec import VersionSpec

T = TypeVar("T")


class ImmutableCache(Generic[T]):
    """id -> what `load` made of an immutable row, kept for good; past `max_entries` the oldest
    entry goes."""

    def __init__(self, load: Callable[[Connection, uuid.UUID], T], max_entries: int) -> None:
        self._load = load
        self._entries: OrderedDict[uuid.UUID, T] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def get(self, conn: Connection, key: uuid.UUID) -> T:
        value = self._entries.get(key)
        if value is None:
            value = self._load(conn, key)
            with self._lock:
                self._entries[key] = value
                if len(self._entries) > self._max:
                    self._entries.popitem(last=False)
        return value


_SPEC_SQL = text(
    """
    SELECT v.id, v.agent_id, a.name AS agent_name, v.version, v.runtime, v.input_schema,
           v.output_schema, v.timeout_seconds, v.retry, v.limits, v.queue, v.config,
           v.concurrency, v.rate_limit, v.org_id, o.name AS org_name
    FROM agent_versions v JOIN agents a ON a.id = v.agent_id
    LEFT JOIN organizations o ON o.id = v.org_id
    WHERE v.id = :id
    """
)


def _load_spec(conn: Connection, version_id: uuid.UUID) -> VersionSpec:
    return VersionSpec(**conn.execute(_SPEC_SQL, {"id": version_id}).mappings().one())


specs: ImmutableCache[VersionSpec] = ImmutableCache(_load_spec, max_entries=1024)
