"""Retention of chain executions: a finished chain execution past its organization's retention
goes with its steps (executions, their attempts and log lines: ON DELETE CASCADE)."""

from __future__ import annotations

from sqlalchemy import Connection

from app.db import driver
from app.executions.spec import TERMINAL_STATUSES

# A chain execution reads `failed` while a sibling step of a parallel group may still run: it
# waits until no step is queued or running (ix_executions_chain_execution_id_chain_stage).
_DELETE_EXPIRED = f"""
    DELETE FROM chain_executions WHERE id = ANY(ARRAY(
        SELECT x.id FROM organizations o
        CROSS JOIN LATERAL (
            SELECT c.id FROM chain_executions c
            WHERE c.org_id = o.id AND c.finished_at IS NOT NULL
              AND c.finished_at < now() - make_interval(
                  days => coalesce(o.retention_days, %(days)s))
              AND c.status IN ('succeeded', 'failed', 'cancelled')
              AND NOT EXISTS (
                  SELECT 1 FROM executions s
                  WHERE s.chain_execution_id = c.id
                    AND s.status NOT IN {TERMINAL_STATUSES!r})
            LIMIT %(batch)s
            FOR UPDATE OF c SKIP LOCKED) x
        WHERE coalesce(o.retention_days, %(days)s) > 0
        LIMIT %(batch)s))
"""


def delete_expired(conn: Connection, default_days: int, batch: int) -> int:
    """Delete up to `batch` expired finished chain executions with their steps; how many went."""
    return driver(conn).execute(_DELETE_EXPIRED, {"days": default_days, "batch": batch}).rowcount
