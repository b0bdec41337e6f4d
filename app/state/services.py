"""An agent's state in an organization: JSON values by key, each with a version that grows by
one per write, so that writers can compare and set (`expected_version`; 0: "must not exist").

Every function takes a SQLAlchemy Connection or an ORM Session (then its connection): a request
passes its session, a worker its attempt's autocommit connection (`ctx.state`,
workers/agent_state.py). Each write is one statement, race-free on its own: an upsert, an insert
that does nothing when the key exists, or an update (a delete) whose WHERE names the expected
version, which PostgreSQL checks again on the row a concurrent writer left, so that of writers
expecting the same version exactly one wins. With an `actor`, the audit event is written in the
caller's transaction, which must enclose both statements (a Session's, as the routes pass);
without one (an agent's own writes) no event is written.

The pair (org_id, agent_id) is the caller's to vouch for: a route resolves the agent in the
caller's organization (`resolve_agent`); the worker passes its execution's organization and
agent (for a catalog run, the caller's organization and the owner's agent: each organization
keeps its own state of a public agent).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from app import storable
from app.agents import services as agents
from app.agents.models import Agent
from app.audit import services as audit
from app.errors import StateConflict, ValidationFailed
from app.orgs.services import Principal

KEY_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
MAX_VALUE_BYTES = 256 * 1024
# An audit event carries a value up to this size (as JSON), and only the size of a larger one.
AUDITED_VALUE_BYTES = 4 * 1024
KEYS_HINT = "GET /api/v1/agents/{ref}/state lists the agent's keys"

Executor = Connection | Session

_WHERE = "WHERE org_id = :org_id AND agent_id = :agent_id"
_WHERE_KEY = f"{_WHERE} AND key = :key"
_ENTRY = text(f"SELECT key, value, version, updated_at FROM agent_state {_WHERE_KEY}")
_VERSION = text(f"SELECT version FROM agent_state {_WHERE_KEY}")
_COUNT = text(f"SELECT count(*) FROM agent_state {_WHERE}")
_KEYS = text(
    f"SELECT key, version, updated_at FROM agent_state {_WHERE} "
    "ORDER BY key OFFSET :offset LIMIT :limit"
)
_INSERT = (
    "INSERT INTO agent_state (org_id, agent_id, key, value, version, updated_at) "
    "VALUES (:org_id, :agent_id, :key, CAST(:value AS jsonb), 1, now()) "
    "ON CONFLICT (org_id, agent_id, key) "
)
# No expected version: the last writer wins.
_UPSERT = text(
    _INSERT + "DO UPDATE SET value = excluded.value, version = agent_state.version + 1, "
    "updated_at = now() RETURNING version, updated_at"
)
# Expected 0: a concurrent insert of the same key makes this one do nothing.
_CREATE = text(_INSERT + "DO NOTHING RETURNING version, updated_at")
_UPDATE = text(
    "UPDATE agent_state SET value = CAST(:value AS jsonb), version = version + 1, "
    f"updated_at = now() {_WHERE_KEY} AND version = :expected RETURNING version, updated_at"
)
_DELETE = text(f"DELETE FROM agent_state {_WHERE_KEY} RETURNING version")
_DELETE_AT = text(f"DELETE FROM agent_state {_WHERE_KEY} AND version = :expected RETURNING version")
_AGENT_NAME = text("SELECT name FROM agents WHERE id = :agent_id")


def _connection(conn: Executor) -> Connection:
    return conn.connection() if isinstance(conn, Session) else conn


def resolve_agent(session: Session, principal: Principal, ref: str, *, write: bool) -> Agent:
    """The agent of the caller's organization whose state a request reads or writes: reading
    is every role's; writing, that of the roles that may submit executions."""
    principal.require("executions:submit" if write else "read")
    return agents.resolve(session, principal, ref)


# ---------------------------------------------------------------------------------------------
# What may be stored


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        shown = repr(key[:80]) if isinstance(key, str) else f"a {type(key).__name__}"
        raise ValidationFailed(
            f"{shown} is not a state key: keys match {KEY_PATTERN}",
            errors={"key": [f"must match {KEY_PATTERN}"]},
            hint="1 to 200 letters, digits and _ . : -, e.g. `customer:42.last_order`",
        )
    return key


def _check_expected(expected_version: Any) -> None:
    if expected_version is None:
        return
    if (
        isinstance(expected_version, bool)
        or not isinstance(expected_version, int)
        or expected_version < 0
    ):
        raise ValidationFailed(
            f"expected_version must be a whole number from 0, not {expected_version!r}",
            errors={"expected_version": ["a whole number from 0 (0: the key must not exist)"]},
            hint="pass the version that entry(key) answered, 0 for a key that must not exist "
            "yet, or None to write whatever the current version is",
        )


def _under_value(pointer: str) -> str:
    return "/value" if pointer == "/" else "/value" + pointer


def serialized(value: Any) -> str:
    """The value as the JSON text that is stored, or ValidationFailed (keyed by JSON pointer
    under `/value`): not JSON, text or numbers PostgreSQL cannot store, or over the size."""
    try:
        dumped = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValidationFailed(
            f"the state value is not JSON: {exc}",
            errors={"/value": [f"not JSON: {exc}"]},
            hint="a value is what JSON holds: objects with string keys, arrays, strings, "
            "numbers, true, false and null",
        ) from None
    # A lone surrogate has no UTF-8 form: looked for before the text is encoded.
    if storable.UNSTORABLE_CHARACTER.search(dumped) or storable.may_hold_unstorable(
        dumped.encode()
    ):
        problems = storable.document_problems(value)
        if problems:
            raise ValidationFailed(
                "the state value holds what PostgreSQL cannot store: U+0000, an unpaired "
                f"surrogate, NaN or an infinite number (at {', '.join(sorted(problems))})",
                errors={_under_value(pointer): found for pointer, found in problems.items()},
                hint=storable.HINT,
            )
    size = len(dumped.encode())
    if size > MAX_VALUE_BYTES:
        raise ValidationFailed(
            f"the state value is {size} bytes as JSON, over the limit of {MAX_VALUE_BYTES}",
            errors={"/value": [f"at most {MAX_VALUE_BYTES} bytes as JSON, not {size}"]},
            hint="keep large data elsewhere (a document, or a store of your own) and its "
            "reference in state, or split it over several keys",
        )
    return dumped


# ---------------------------------------------------------------------------------------------
# Reading


def entry(conn: Executor, org_id: uuid.UUID, agent_id: uuid.UUID, key: str) -> dict | None:
    """`{"key", "value", "version", "updated_at"}`, or None when the key is not set."""
    params = {"org_id": org_id, "agent_id": agent_id, "key": check_key(key)}
    row = _connection(conn).execute(_ENTRY, params).mappings().first()
    return None if row is None else dict(row)


def version_of(conn: Executor, org_id: uuid.UUID, agent_id: uuid.UUID, key: str) -> int:
    """The key's current version, 0 when it is not set."""
    params = {"org_id": org_id, "agent_id": agent_id, "key": key}
    return _connection(conn).execute(_VERSION, params).scalar() or 0


def keys(
    conn: Executor, org_id: uuid.UUID, agent_id: uuid.UUID, *, offset: int = 0, limit: int = 100
) -> tuple[list[dict], int]:
    """One page of the agent's keys (`{"key", "version", "updated_at"}`, by key) and their
    total."""
    connection = _connection(conn)
    params = {"org_id": org_id, "agent_id": agent_id}
    total = connection.execute(_COUNT, params).scalar_one()
    if offset >= total:  # also a page past PostgreSQL's bigint OFFSET: no rows, no query
        return [], total
    rows = connection.execute(_KEYS, {**params, "offset": offset, "limit": limit}).mappings()
    return [dict(row) for row in rows], total


# ---------------------------------------------------------------------------------------------
# Writing


def put(
    conn: Executor,
    org_id: uuid.UUID,
    agent_id: uuid.UUID,
    key: str,
    value: Any,
    expected_version: int | None = None,
    actor: audit.Actor | None = None,
) -> dict:
    """Set the key's value: `{"key", "value" (as given), "version", "updated_at"}`. With
    `expected_version`, only when the key is at that version (0: not set); StateConflict,
    carrying the current version, when it is not."""
    params = {"org_id": org_id, "agent_id": agent_id, "key": check_key(key)}
    _check_expected(expected_version)
    stored = serialized(value)
    connection = _connection(conn)
    params["value"] = stored
    if expected_version is None:
        row = connection.execute(_UPSERT, params).one()
    elif expected_version == 0:
        row = connection.execute(_CREATE, params).first()
    else:
        row = connection.execute(_UPDATE, {**params, "expected": expected_version}).first()
    if row is None:
        current = version_of(connection, org_id, agent_id, key)
        raise StateConflict(key, expected_version or 0, current)
    if actor is not None:
        op = "add" if row.version == 1 else "replace"
        size = len(stored.encode())
        shown = (
            {"op": op, "path": "/value", "value": value}
            if size < AUDITED_VALUE_BYTES
            else {"op": op, "path": "/size", "value": size}
        )
        changes = [shown, {"op": op, "path": "/version", "value": row.version}]
        _audit(connection, actor, "state.put", agent_id, key, changes)
    return {"key": key, "value": value, "version": row.version, "updated_at": row.updated_at}


def delete(
    conn: Executor,
    org_id: uuid.UUID,
    agent_id: uuid.UUID,
    key: str,
    expected_version: int | None = None,
    actor: audit.Actor | None = None,
) -> bool:
    """Remove the key: True, or False when it was not set. With `expected_version`, only when
    the key is at that version; StateConflict when it is not (0 and not set: False)."""
    params = {"org_id": org_id, "agent_id": agent_id, "key": check_key(key)}
    _check_expected(expected_version)
    connection = _connection(conn)
    if expected_version is None:
        row = connection.execute(_DELETE, params).first()
    else:
        row = connection.execute(_DELETE_AT, {**params, "expected": expected_version}).first()
    if row is None:
        if expected_version is None:
            return False
        current = version_of(connection, org_id, agent_id, key)
        if expected_version == 0 and current == 0:
            return False
        raise StateConflict(key, expected_version, current)
    if actor is not None:
        changes = [
            {"op": "test", "path": "/version", "value": row.version},
            {"op": "remove", "path": "/value"},
        ]
        _audit(connection, actor, "state.delete", agent_id, key, changes)
    return True


def _audit(
    connection: Connection,
    actor: audit.Actor,
    action: str,
    agent_id: uuid.UUID,
    key: str,
    changes: list[dict[str, Any]],
) -> None:
    """The object is the agent's state (its id, so that `object_id=<agent id>` lists every
    change of it), named `<agent name>/<key>`."""
    agent_name = connection.execute(_AGENT_NAME, {"agent_id": agent_id}).scalar()
    audit.record(
        connection,
        actor,
        audit.Change(action, "agent_state", agent_id, f"{agent_name}/{key}", changes),
    )
