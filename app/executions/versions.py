"""Agent versions as the hot path needs them, cached per process for good: a version never
changes once written."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict

from sqlalchemy import Connection, text

from app.executions.spec import VersionSpec

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
