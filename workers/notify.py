"""Delivering notification events: POST each, signed, to its subscription's URL.

Run by the task a writer publishes after its commit (with the new events' ids) and by beat
every RUNYARD_NOTIFY_POLL_SECONDS for whatever is due (workers/maintenance.py), so a lost
message only delays a delivery. The database side (claiming, bodies, outcomes) is
app/notifications/delivery.py.

Each POST carries `Runyard-Event-Id` and `Runyard-Signature: t=<unix seconds>,v1=<hex
HMAC-SHA256 of "<t>.<raw body>">` (Stripe's scheme: the timestamp is signed, so a captured
request cannot be replayed later with a fresh one). It goes through the http runtime's
client: the address guard on the resolved addresses (connecting to those very addresses), a
5 s connect and 10 s total timeout, no redirect followed. A 2xx delivers it; anything else is
retried with exponential backoff until its window ends; an address the guard refuses fails it
at once.
"""

from __future__ import annotations

import functools
import logging
import ssl
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from app import signing
from app.config import current_config
from app.db import db
from app.notifications import delivery
from workers.runtimes.http import CallFailed, post_once

log = logging.getLogger(__name__)

CONNECT_SECONDS = 5.0
TIMEOUT_SECONDS = 10.0
# A receiver's answer is read only for its status: a little of it goes to last_error.
MAX_ANSWER_BYTES = 64 * 1024
USER_AGENT = "runyard-notifications/1"


@dataclass(frozen=True)
class Result:
    event_id: uuid.UUID
    attempts: int
    code: int | None  # the answer's status; None when there was no answer
    error: str | None  # None: delivered
    final: bool = False

    @property
    def delivered(self) -> bool:
        return self.error is None and self.code is not None


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def send(due: delivery.Due, allow_hosts: tuple[str, ...]) -> Result:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Runyard-Event-Id": str(due.id),
        "Runyard-Signature": signing.header(due.secret, int(time.time()), due.body),
    }
    try:
        answer = post_once(
            due.url,
            due.body,
            headers,
            connect_seconds=CONNECT_SECONDS,
            timeout_seconds=TIMEOUT_SECONDS,
            max_bytes=MAX_ANSWER_BYTES,
            allow_hosts=allow_hosts,
            tls_context=_tls_context(),
        )
    except CallFailed as failed:
        # Retryable: could not resolve, connect or read in time. Final: the guard refused the
        # address, the URL is malformed, or the TLS certificate was refused.
        final = not failed.retryable and failed.error_type == "runtime_error"
        return Result(due.id, due.attempts, None, failed.message, final)
    if 200 <= answer.status < 300:
        return Result(due.id, due.attempts, answer.status, None)
    excerpt = answer.body[:200].decode("utf-8", "replace")
    return Result(due.id, due.attempts, answer.status, f"HTTP {answer.status}: {excerpt}")


def deliver(event_ids: list[uuid.UUID] | None = None, limit: int = 100) -> int:
    """Claim due events (only these, when given), POST them at most RUNYARD_NOTIFY_CONCURRENCY
    at a time, record how each went; how many were claimed."""
    cfg = current_config()
    with db.begin() as conn:
        rows = delivery.claim(conn, limit, event_ids)
    if not rows:
        return 0
    session = db.session()
    try:
        due = delivery.prepare(session, rows)
        session.commit()
    finally:
        session.close()
    workers = min(cfg.notify_concurrency, len(due))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="notify") as pool:
        results = list(pool.map(lambda one: send(one, cfg.http_allow_hosts), due))
    with db.begin() as conn:
        delivery.delivered(
            conn,
            [(result.event_id, result.code) for result in results if result.delivered],
        )
        for result in results:
            if result.delivered:
                continue
            delivery.not_delivered(
                conn,
                result.event_id,
                code=result.code,
                error=result.error or "",
                delay=delivery.backoff_seconds(cfg.notify_first_retry_seconds, result.attempts),
                window=cfg.notify_retry_window_seconds,
                final=result.final,
            )
    return len(rows)


# Batches one beat run delivers at most: the next run goes on.
MAX_BATCHES_PER_RUN = 10


def deliver_due() -> int:
    """Beat's job: deliver what is due, batch after batch; how many were claimed."""
    total = 0
    for _batch in range(MAX_BATCHES_PER_RUN):
        claimed = deliver()
        total += claimed
        if claimed == 0:
            break
    return total
