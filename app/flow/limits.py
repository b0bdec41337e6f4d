"""An organization's limits: set by whoever runs the installation (`runyard orgs limits`), read
on every submit from a short per-process cache."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, text

from app.config import current_config

T = TypeVar("T")


@dataclass(frozen=True)
class OrgLimits:
    max_running: int | None = None
    max_queued: int | None = None
    submit_rate: float | None = None
    submit_burst: int | None = None
    cpu_seconds_per_day: float | None = None
    weight: int = 1
    # Not a limit on admission: how many days its finished executions are kept (beat's
    # retention job reads the column itself; None: RUNYARD_RETENTION_DAYS).
    retention_days: int | None = None

    @property
    def burst(self) -> int:
        """Submits at once above the rate: submit_burst, else the rate (at least one)."""
        if self.submit_burst is not None:
            return self.submit_burst
        return max(1, round(self.submit_rate or 1))

    @property
    def quotas(self) -> bool:
        """Whether any limit is checked when work is submitted."""
        return any(
            value is not None
            for value in (self.max_queued, self.submit_rate, self.cpu_seconds_per_day)
        )

    def as_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


NAMES = tuple(field.name for field in fields(OrgLimits))
_READ = text(f"SELECT {', '.join(NAMES)} FROM organizations WHERE id = :id")


def read(conn: Connection, org_id: uuid.UUID) -> OrgLimits:
    row = conn.execute(_READ, {"id": org_id}).mappings().one()
    return OrgLimits(**row)


class TtlCache(Generic[T]):
    """org id -> what `load` read for it, trusted for RUNYARD_LIMITS_CACHE_SECONDS: a change
    (limits set on the command line, CPU used since) is seen by every API process within that."""

    def __init__(self, load: Callable[[Connection, uuid.UUID], T]) -> None:
        self._load = load
        self._entries: dict[uuid.UUID, tuple[float, T]] = {}
        self._lock = threading.Lock()

    def get(self, conn: Connection, org_id: uuid.UUID) -> T:
        entry = self._entries.get(org_id)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        value = self._load(conn, org_id)
        expires = time.monotonic() + current_config().limits_cache_seconds
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[org_id] = (expires, value)
        return value

    def forget(self, org_id: uuid.UUID) -> None:
        self._entries.pop(org_id, None)


cache: TtlCache[OrgLimits] = TtlCache(read)
