"""Semantic versions of definitions (agents, chains): every versioned change adds an immutable
version row and makes it the current one; a rollback makes an existing one current again."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import NotFound, ValidationFailed

FIRST_VERSION = "1.0.0"


def parse_semver(version: str) -> tuple[int, int, int]:
    major, minor, patch = (int(part) for part in version.split("."))
    return major, minor, patch


def next_version(session: Session, owner_column: Any, owner: Any, wanted: str | None) -> str:
    """The number of an owner's next version: `wanted` when it is above every existing one
    (else 422), by default the latest's next patch. `owner_column` names the owner in its
    versions' table (AgentVersion.agent_id, ChainVersion.chain_id)."""
    version_model = owner_column.class_
    latest = session.execute(
        select(version_model.major, version_model.minor, version_model.patch)
        .where(owner_column == owner.id)
        .order_by(
            version_model.major.desc(), version_model.minor.desc(), version_model.patch.desc()
        )
        .limit(1)
    ).one()
    if wanted is None:
        return f"{latest[0]}.{latest[1]}.{latest[2] + 1}"
    if parse_semver(wanted) <= tuple(latest):
        raise ValidationFailed(
            f"version {wanted} is not above the latest, {'.'.join(map(str, latest))}",
            errors={"/version": ["must be greater than every existing version"]},
        )
    return wanted


def refuse_changelog(changelog: str | None, what: str) -> None:
    """A PATCH that makes no new version has nowhere to keep a changelog (422)."""
    if changelog is not None:
        raise ValidationFailed(
            "nothing versioned changed, so there is no new version for the changelog",
            errors={"/changelog": [f"only given with a change to {what}"]},
        )


def add_version(
    session: Session,
    owner_column: Any,
    owner: Any,
    definition: dict[str, Any],
    version: str,
    changelog: str | None = None,
    created_by: dict[str, Any] | None = None,
) -> Any:
    """Insert the owner's version `version` of `definition` and make it current;
    `created_by`: its created_by_* columns (audit.created_by of the caller)."""
    major, minor, patch = parse_semver(version)
    row = owner_column.class_(
        **{owner_column.key: owner.id},
        org_id=owner.org_id,
        version=version,
        major=major,
        minor=minor,
        patch=patch,
        changelog=changelog,
        **definition,
        **(created_by or {}),
    )
    session.add(row)
    session.flush()
    owner.current_version_id = row.id
    owner.current_version = version
    owner.updated_at = utcnow()
    session.flush()
    return row


def find_version(session: Session, owner_column: Any, owner: Any, version: str, kind: str) -> Any:
    """The owner's version `version` (404 naming where the versions are listed)."""
    version_model = owner_column.class_
    row = session.scalar(
        select(version_model).where(owner_column == owner.id, version_model.version == version)
    )
    if row is None:
        raise NotFound(
            f"{kind} {owner.name!r} has no version {version!r}",
            hint=f"GET /api/v1/{kind}s/{owner.name}/versions lists them",
        )
    return row


def make_current(owner: Any, row: Any) -> None:
    """Point the owner at an existing version (a rollback): no version is made, and the next
    one is still numbered after the highest (next_version)."""
    if owner.current_version_id != row.id:
        owner.current_version_id = row.id
        owner.current_version = row.version
        owner.updated_at = utcnow()
