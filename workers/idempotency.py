"""Thin task: delete idempotency keys past their 24 hours (beat)."""

from __future__ import annotations

import logging

from app.idempotency import services
from workers import app
from workers.tasks import DatabaseTask

log = logging.getLogger(__name__)


@app.task(name="runyard.idempotency_prune", base=DatabaseTask)
def prune() -> int:
    deleted = services.prune()
    if deleted:
        log.info("idempotency: deleted %d expired keys", deleted)
    return deleted
