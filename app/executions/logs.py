"""Log lines across an organization's executions (GET /logs), and every line of one execution
as a stream (GET /executions/{id}/logs?format=ndjson|csv)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import func, literal, select
from sqlalchemy.orm import Session

from app.agents.models import Agent
from app.config import current_config
from app.db import db
from app.errors import ValidationFailed
from app.executions.models import Execution, ExecutionLog
from app.executions.spec import LEVEL_NAMES, LEVELS
from app.orgs.services import Principal

# X-Pagination's total counts matching lines up to this many (and pages stop there): counting
# every line of a busy organization would read them all on every page. since/until narrow a
# search past it.
COUNT_CAP = 10_000
# An export reads this many lines a query, each in a transaction of its own (no snapshot or
# connection held for the length of a download).
EXPORT_PAGE_LINES = 5_000
EXPORT_COLUMNS = ("seq", "ts", "level", "message", "fields", "attempt")
EXPORT_MEDIA_TYPES = {"ndjson": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}
_LINE = (
    ExecutionLog.seq,
    ExecutionLog.ts,
    ExecutionLog.level,
    ExecutionLog.message,
    ExecutionLog.fields,
    ExecutionLog.attempt,
)


def line(row: Any) -> dict[str, Any]:
    """A line as GET /executions/{id}/logs shows it."""
    return {
        "seq": row.seq,
        "ts": row.ts,
        "level": LEVEL_NAMES.get(row.level, str(row.level)),
        "message": row.message,
        "fields": row.fields or {},
        "attempt": row.attempt,
    }


def contains(q: str) -> Any:
    escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return ExecutionLog.message.ilike(f"%{escaped}%", escape="\\")


def _text_window(
    since: dt.datetime | None, until: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime | None]:
    """`q` is a scan of the lines the other filters select (no text index: the embedded
    PostgreSQL has no pg_trgm), so across executions it reads at most
    RUNYARD_LOG_SEARCH_MAX_DAYS: since defaults to that long before until (or now)."""
    days = current_config().log_search_max_days
    upper = until or dt.datetime.now(dt.UTC)
    if since is None:
        return upper - dt.timedelta(days=days), until
    if upper - since > dt.timedelta(days=days):
        raise ValidationFailed(
            f"a text search (q) spans at most {days} days from since to until",
            errors={"since": [f"at most {days} days before until (or now) when q is given"]},
            hint="narrow since/until, or give execution_id to search one execution's lines",
        )
    return since, until


def search(
    session: Session,
    principal: Principal,
    *,
    agent: str | None = None,
    execution_id: uuid.UUID | None = None,
    level: str | None = None,
    q: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    offset: int,
    limit: int,
) -> tuple[list[dict[str, Any]], int]:
    """One page of the organization's lines, newest first, and how many match (up to
    COUNT_CAP). Another organization's execution_id or agent matches nothing."""
    conditions = [ExecutionLog.org_id == principal.org_id]
    if execution_id is not None:
        conditions.append(ExecutionLog.execution_id == execution_id)
    elif q:
        since, until = _text_window(since, until)
    if agent:
        try:
            agent_match = Execution.agent_id == uuid.UUID(agent)
        except ValueError:
            agent_match = Execution.agent_id.in_(
                select(Agent.id).where(Agent.org_id == principal.org_id, Agent.name == agent)
            )
        conditions.append(
            ExecutionLog.execution_id.in_(
                select(Execution.id).where(Execution.org_id == principal.org_id, agent_match)
            )
        )
    if level:
        conditions.append(ExecutionLog.level >= LEVELS[level])
    if q:
        conditions.append(contains(q))
    if since:
        conditions.append(ExecutionLog.ts >= since)
    if until:
        conditions.append(ExecutionLog.ts < until)
    matching = select(literal(1)).select_from(ExecutionLog).where(*conditions).limit(COUNT_CAP)
    total = session.scalar(select(func.count()).select_from(matching.subquery())) or 0
    if offset >= total:
        return [], total
    rows = session.execute(
        select(ExecutionLog.execution_id, Execution.agent_name, *_LINE)
        .join(Execution, Execution.id == ExecutionLog.execution_id)
        .where(*conditions)
        .order_by(ExecutionLog.ts.desc(), ExecutionLog.execution_id.desc(), ExecutionLog.seq.desc())
        .offset(offset)
        .limit(min(limit, total - offset))
    ).all()
    return [
        {"execution_id": row.execution_id, "agent_name": row.agent_name, **line(row)}
        for row in rows
    ], total


def export_pages(
    execution_id: uuid.UUID,
    *,
    level: str | None = None,
    q: str | None = None,
    after_seq: int | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Every line of an execution the filters keep, in seq order, EXPORT_PAGE_LINES at a time.
    The caller checked the execution is the caller's: this reads by id only."""
    conditions = [ExecutionLog.execution_id == execution_id]
    if level:
        conditions.append(ExecutionLog.level >= LEVELS[level])
    if q:
        conditions.append(contains(q))
    last = -1 if after_seq is None else after_seq
    while True:
        # Keyset pages through the primary key (execution_id, seq): every page costs the same.
        with db.begin() as conn:
            rows = conn.execute(
                select(*_LINE)
                .where(*conditions, ExecutionLog.seq > last)
                .order_by(ExecutionLog.seq)
                .limit(EXPORT_PAGE_LINES)
            ).all()
        if rows:
            yield [line(row) for row in rows]
        if len(rows) < EXPORT_PAGE_LINES:
            return
        last = rows[-1].seq


def _exported(item: dict[str, Any]) -> dict[str, Any]:
    return {**item, "ts": item["ts"].isoformat()}


def ndjson_chunks(pages: Iterable[list[dict[str, Any]]]) -> Iterator[str]:
    """One JSON object a line, as GET /executions/{id}/logs shows each."""
    for lines in pages:
        yield "".join(json.dumps(_exported(item)) + "\n" for item in lines)


def csv_chunks(pages: Iterable[list[dict[str, Any]]]) -> Iterator[str]:
    """A header, then a row a line; `fields` as JSON text. The csv module quotes what needs it
    (commas, quotes, line breaks in a message)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for lines in pages:
        for item in map(_exported, lines):
            item["fields"] = json.dumps(item["fields"])
            writer.writerow([item[column] for column in EXPORT_COLUMNS])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():  # no line at all: the header alone
        yield buffer.getvalue()


def export(
    execution_id: uuid.UUID,
    fmt: str,
    *,
    level: str | None = None,
    q: str | None = None,
    after_seq: int | None = None,
) -> Iterator[str]:
    pages = export_pages(execution_id, level=level, q=q, after_seq=after_seq)
    return ndjson_chunks(pages) if fmt == "ndjson" else csv_chunks(pages)
