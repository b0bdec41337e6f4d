"""Placeholder for the lead's module: event waits resumed by app/events/services.py.

The lead replaces this module at merge; these stand-ins resume nothing."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import Connection


def resume_for_event(
    conn: Connection,
    org_id: uuid.UUID,
    event_pk: uuid.UUID,
    name: str,
    data: dict[str, Any],
    received_at: dt.datetime,
) -> list[uuid.UUID]:
    """The waiting executions this event resumed, in the caller's transaction."""
    return []


def publish_resumed(conn: Connection, ids: list[uuid.UUID]) -> None:
    """Publish the resumed executions, once the caller's transaction has committed."""
    return None
