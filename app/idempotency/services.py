"""Idempotency keys: a POST sent again with the same `Idempotency-Key` gets the first answer.

The keyed request runs in one transaction that also holds the key's row (app/http.py opens it
with `db.begin_request`): `claim` inserts the row first, so a concurrent request with the same
key waits on the primary key until the first one ends, then finds the row and replays it; if the
first one rolled back, the waiting insert goes through and that request runs instead. The answer
is stored by `record` in the same transaction as what the request created, so a key is either
free or carries the answer of work that is committed: never half-done.

Keys are scoped to the organization and live 24 hours; an older row counts as absent and is taken
over. `prune` deletes expired rows (beat, workers/idempotency.py).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import Connection

from app.db import db
from app.db import driver as driver_of
from app.errors import Conflict, ValidationFailed

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotency-Replayed"
MAX_KEY_LENGTH = 255
RETENTION_HOURS = 24
# How long a repeat waits for the first request with its key to finish before answering 409;
# below the 8 s statement timeout, so a request never hangs past 10 s.
LOCK_TIMEOUT = "5s"
PRUNE_BATCH = 1000

_EXPIRED = f"created_at < now() - interval '{RETENTION_HOURS} hours'"

_INSERT_SQL = """
    INSERT INTO idempotency_keys (org_id, key, request_hash) VALUES (%(org_id)s, %(key)s, %(hash)s)
    ON CONFLICT (org_id, key) DO NOTHING
    RETURNING 1
"""
_STORED_SQL = f"""
    SELECT request_hash, response_status, response_body, {_EXPIRED} AS expired
    FROM idempotency_keys WHERE org_id = %(org_id)s AND key = %(key)s
"""
# Waits on the row lock of a concurrent takeover, then re-checks the age: only one request
# takes an expired key over.
_TAKE_OVER_SQL = f"""
    UPDATE idempotency_keys
    SET request_hash = %(hash)s, response_status = NULL, response_body = NULL, created_at = now()
    WHERE org_id = %(org_id)s AND key = %(key)s AND {_EXPIRED}
    RETURNING 1
"""
_RECORD_SQL = """
    UPDATE idempotency_keys SET response_status = %(status)s, response_body = %(body)s
    WHERE org_id = %(org_id)s AND key = %(key)s
"""
_PRUNE_SQL = f"""
    DELETE FROM idempotency_keys
    WHERE (org_id, key) IN (
        SELECT org_id, key FROM idempotency_keys WHERE {_EXPIRED}
        LIMIT %(limit)s FOR UPDATE SKIP LOCKED
    )
"""


@dataclass(frozen=True)
class Replay:
    """The stored answer to the first request with a key."""

    status: int
    body: Any


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ValidationFailed(
            f"the {HEADER} header must be 1 to {MAX_KEY_LENGTH} printable characters",
            errors={HEADER: [f"1..{MAX_KEY_LENGTH} printable characters"]},
            hint="use a UUID (uuid4) per request you may need to send again",
        )


def request_hash(method: str, path: str, body: bytes) -> str:
    """What makes two requests the same request: method, path and the JSON body, parsed and
    written out canonically, so key order and whitespace do not count. A body that is not JSON
    counts as its bytes (it gets its 400 either way)."""
    try:
        canonical = json.dumps(
            json.loads(body), sort_keys=True, separators=(",", ":"), allow_nan=False
        ).encode()
    except ValueError:
        canonical = body
    digest = hashlib.sha256(f"{method} {path}\n".encode())
    digest.update(canonical)
    return digest.hexdigest()


def claim(conn: Connection, org_id: uuid.UUID, key: str, hashed: str) -> Replay | None:
    """Take the key for this request (None: carry it out), or the first request's answer.

    Runs first in the request's transaction; the row it writes is locked until that ends."""
    driver = driver_of(conn)
    driver.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    try:
        replay = _claim(driver, {"org_id": org_id, "key": key, "hash": hashed})
    except psycopg.errors.LockNotAvailable as exc:
        raise _in_progress() from exc
    # The bound is for the wait on the key only: the request's own statements, in the same
    # transaction, wait for their locks as any request does (statement_timeout), not 5 s and
    # then a LockNotAvailable that would read as "the database cannot be reached".
    if replay is None:
        driver.execute("SET LOCAL lock_timeout TO DEFAULT")
    return replay


def _claim(driver: psycopg.Connection, params: dict[str, Any]) -> Replay | None:
    # Two rounds at most: a row found expired and taken over by another request, or pruned
    # between the insert and the read, sends this one round again.
    for _ in range(2):
        if driver.execute(_INSERT_SQL, params).fetchone() is not None:
            return None
        stored = driver.execute(_STORED_SQL, params).fetchone()
        if stored is None:
            continue
        stored_hash, status, body, expired = stored
        if expired:
            if driver.execute(_TAKE_OVER_SQL, params).fetchone() is not None:
                return None
            continue
        if stored_hash != params["hash"]:
            raise ValidationFailed(
                f"this {HEADER} was used for a different request",
                errors={HEADER: ["already used with another method, path or body"]},
                hint="use a new key for a different request",
            )
        return Replay(status, body)
    raise _in_progress()


def _in_progress() -> Conflict:
    return Conflict(
        f"a request with this {HEADER} is still in progress",
        hint="send it again in a few seconds: you get its answer once it has finished",
    )


def record(conn: Connection, org_id: uuid.UUID, key: str, status: int, body: Any) -> None:
    """Store the answer in the claimed row, in the request's transaction."""
    driver_of(conn).execute(
        _RECORD_SQL,
        {"org_id": org_id, "key": key, "status": status, "body": Jsonb(body)},
    )


def prune(batch_size: int = PRUNE_BATCH) -> int:
    """Delete keys older than 24 hours, a batch per statement; the number deleted."""
    deleted = 0
    while True:
        with db.hot() as conn:
            count = driver_of(conn).execute(_PRUNE_SQL, {"limit": batch_size}).rowcount
        deleted += count
        if count < batch_size:
            return deleted
