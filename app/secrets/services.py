"""Secrets of an organization: set (sealed), listed (never their values), deleted, checked as
references, and opened for the worker that runs an agent using them."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.audit import services as audit
from app.db import page
from app.errors import NotFound, ValidationFailed, json_pointer
from app.orgs.services import Principal
from app.secrets import references
from app.secrets.crypto import is_sealed, keyring, sealed_key_id
from app.secrets.models import Secret

LIST_HINT = "GET /api/v1/secrets lists your organization's secrets"


def context(org_id: uuid.UUID, name: str) -> str:
    """The associated data of a secret's ciphertext: it opens for this row only."""
    return f"secret:{org_id}:{name}"


def _check_name(name: str) -> None:
    if not references.NAME.match(name):
        raise ValidationFailed(
            f"{name[:80]!r} is not a secret name",
            errors={"name": [f"must match {references.NAME_PATTERN}"]},
            hint="lowercase letters, digits, - and _, starting with a letter or digit",
        )


def put(session: Session, principal: Principal, name: str, value: str) -> dict[str, Any]:
    """Set a secret's value: a new secret at version 1, or the next version of one."""
    principal.require("secrets:write")
    _check_name(name)
    sealed = keyring().seal(value, context(principal.org_id, name))
    statement = (
        insert(Secret)
        .values(org_id=principal.org_id, name=name, sealed_value=sealed, version=1)
        .on_conflict_do_update(
            constraint="uq_secrets_org_id_name",
            set_={
                "sealed_value": sealed,
                "version": Secret.version + 1,
                "updated_at": func.now(),
            },
        )
        .returning(Secret.id, Secret.name, Secret.version, Secret.created_at, Secret.updated_at)
    )
    stored = dict(session.execute(statement).one()._mapping)
    # The event names the secret and its new version, never the value.
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change(
            "secret.put",
            "secret",
            stored.pop("id"),
            name,
            [{"op": "replace", "path": "/version", "value": stored["version"]}],
        ),
    )
    return stored


def list_secrets(
    session: Session, principal: Principal, *, offset: int, limit: int
) -> tuple[list[Secret], int]:
    query = select(Secret).where(Secret.org_id == principal.org_id)
    return page(session, query, Secret.name, offset=offset, limit=limit)


def delete(session: Session, principal: Principal, name: str) -> None:
    principal.require("secrets:write")
    row = session.scalar(
        select(Secret).where(Secret.org_id == principal.org_id, Secret.name == name)
    )
    if row is None:
        raise NotFound(f"no secret {name[:80]!r}", hint=LIST_HINT)
    session.delete(row)
    session.flush()
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change("secret.delete", "secret", row.id, row.name),
    )


def check_references(session: Session, org_id: uuid.UUID, config: Any, runtime: Any) -> None:
    """422, keyed by JSON pointer, for a malformed reference or one naming no secret."""
    places = references.found(config, runtime)
    if not places:
        return
    errors = references.form_errors(places)
    wanted = {node[references.KEY] for _, node in places if isinstance(node[references.KEY], str)}
    known = set(
        session.scalars(select(Secret.name).where(Secret.org_id == org_id, Secret.name.in_(wanted)))
    )
    for path, node in places:
        pointer = json_pointer(path)
        name = node[references.KEY]
        if pointer not in errors and name not in known:
            errors[pointer] = [f"no secret named {name!r} in your organization"]
    if errors:
        raise ValidationFailed(
            "the definition refers to secrets that do not exist or are malformed",
            errors=errors,
            hint='PUT /api/v1/secrets/<name> {"value": ...} first; ' + LIST_HINT,
        )


class SecretsMissing(NotFound):
    """Secrets an execution refers to are gone (deleted after the agent was made)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(
            f"the agent refers to secrets that no longer exist: {', '.join(names)}",
            hint="PUT /api/v1/secrets/<name> to set them again, or PATCH the agent to stop "
            "referring to them",
        )
        self.names = names


_VALUES = text(
    "SELECT name, sealed_value FROM secrets WHERE org_id = :org_id AND name = ANY(:names)"
)


def values(conn: Connection, org_id: uuid.UUID, names: frozenset[str]) -> dict[str, str]:
    """The plain values of these secrets (the worker's, at run time); SecretsMissing for names
    that no longer exist, KeyMissing when no configured key opens one."""
    rows = conn.execute(_VALUES, {"org_id": org_id, "names": sorted(names)}).all()
    missing = sorted(names - {row.name for row in rows})
    if missing:
        raise SecretsMissing(missing)
    ring = keyring()
    return {row.name: ring.open(row.sealed_value, context(org_id, row.name)) for row in rows}


def reencrypt(session: Session) -> tuple[int, int]:
    """Seal every secret not under the first key again under it: (resealed, total)."""
    ring = keyring()
    current = ring.current_id
    resealed = total = 0
    for row in session.scalars(select(Secret)).all():
        total += 1
        if sealed_key_id(row.sealed_value) != current:
            where = context(row.org_id, row.name)
            row.sealed_value = ring.seal(ring.open(row.sealed_value, where), where)
            resealed += 1
    session.flush()
    return resealed, total


# Tables whose `secret` column holds a sealed webhook or notification secret, and the prefix of
# its associated data (`<prefix>:<row id>`).
SEALED_COLUMNS = {"triggers": "trigger", "notifications": "notification"}


def reencrypt_column(session: Session, table: str) -> tuple[int, int]:
    """Seal every secret of `table` (triggers, notifications) that is in clear or under an
    older key again under the first key: (resealed, total)."""
    kind = SEALED_COLUMNS[table]
    ring = keyring()
    current = ring.current_id
    # An event trigger has no secret.
    rows = session.execute(
        text(f"SELECT id, secret FROM {table} WHERE secret IS NOT NULL FOR UPDATE")
    ).all()
    resealed = 0
    for row_id, secret in rows:
        if sealed_key_id(secret) == current:
            continue
        where = f"{kind}:{row_id}"
        plain = ring.open(secret, where) if is_sealed(secret) else secret
        session.execute(
            text(f"UPDATE {table} SET secret = :secret WHERE id = :id"),
            {"secret": ring.seal(plain, where), "id": row_id},
        )
        resealed += 1
    return resealed, len(rows)
