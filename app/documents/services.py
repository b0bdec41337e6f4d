"""Documents: files an organization uploads once and hands to executions as context.

Uploaded (up to RUNYARD_MAX_DOCUMENT_MB; bytes in PostgreSQL or in RUNYARD_DOCUMENTS_PATH, see
app/documents/storage.py), listed, read, deleted (refused while an unfinished execution uses
it), attached to executions at submit (`attaching`, in the transaction that inserts them), and
read by the worker that runs such an execution (`attached`, `content_of`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, BinaryIO

import psycopg
from sqlalchemy import Connection, select, text
from sqlalchemy.orm import Session

from app.audit import services as audit
from app.config import current_config
from app.db import driver, page
from app.documents import storage
from app.documents.models import Document
from app.errors import Conflict, NotFound, ValidationFailed
from app.orgs.services import Principal

LIST_HINT = "GET /api/v1/documents lists your organization's documents"
MAX_NAME_CHARS = 255
MAX_PER_EXECUTION = 50
DEFAULT_CONTENT_TYPE = "application/octet-stream"
# type/subtype as RFC 9110 tokens, and an optional charset: what a document is answered with.
_TOKEN = r"[!#$%&'*+.^_`|~0-9a-z-]+"
_MEDIA_TYPE = re.compile(rf"^{_TOKEN}/{_TOKEN}$")
_CHARSET = re.compile(rf"^{_TOKEN}$")
# What an execution still needs its documents for: anything but its end.
FINISHED = ("succeeded", "failed", "timed_out", "cancelled")


# ---------------------------------------------------------------------------------------------
# The API


def _check_name(name: str | None) -> str:
    if not name:
        raise ValidationFailed(
            "a document needs a name",
            errors={"name": ["Missing data for required field."]},
            hint="POST /api/v1/documents?name=<file name> with the file as the body",
        )
    if len(name) > MAX_NAME_CHARS:
        raise ValidationFailed(
            f"the name is {len(name)} characters long",
            errors={"name": [f"at most {MAX_NAME_CHARS} characters"]},
            hint="send a shorter name",
        )
    return name


def content_type_of(mimetype: str, charset: str | None) -> str:
    """The media type a document is stored and answered with: `type/subtype`, lowercase, with
    its charset when the upload named one; 422 for what is no media type."""
    mimetype = (mimetype or DEFAULT_CONTENT_TYPE).lower()
    if not _MEDIA_TYPE.match(mimetype) or len(mimetype) > 200:
        raise ValidationFailed(
            f"{mimetype[:80]!r} is not a media type",
            errors={"Content-Type": ["a media type such as text/plain or application/pdf"]},
            hint="send the file's media type as the Content-Type header "
            "(application/octet-stream when unknown)",
        )
    if charset and _CHARSET.match(charset.lower()) and len(charset) <= 40:
        return f"{mimetype}; charset={charset.lower()}"
    return mimetype


def upload(
    session: Session,
    principal: Principal,
    name: str | None,
    media_type: tuple[str, str | None],
    stream: BinaryIO,
) -> Document:
    """Store a document read from `stream` (its media type: the upload's mimetype and charset),
    with its audit event (name, size and sha256, never the bytes), in the session's
    transaction."""
    principal.require("executions:submit")
    name = _check_name(name)
    content_type = content_type_of(*media_type)
    received = storage.receive(stream, current_config().max_document_bytes)
    document = Document(
        id=uuid.uuid4(),
        org_id=principal.org_id,
        name=name,
        content_type=content_type,
        size=received.size,
        sha256=received.sha256,
        content=received.content,
        **audit.created_by(principal),
    )
    try:
        storage.keep(received, document.id)
        session.add(document)
        session.flush()
        audit.record(
            session,
            audit.Actor.of(principal),
            audit.Change("document.upload", "document", document.id, name, _described(document)),
        )
    except BaseException:
        received.discard()
        storage.remove(document.id)
        raise
    return document


def _described(document: Document) -> list[dict[str, Any]]:
    return [
        {"op": "add", "path": f"/{key}", "value": getattr(document, key)}
        for key in ("content_type", "size", "sha256")
    ]


def list_documents(
    session: Session, principal: Principal, *, q: str | None, offset: int, limit: int
) -> tuple[list[Document], int]:
    """The organization's documents, newest first; `q`: a part of the name, in any case."""
    query = select(Document).where(Document.org_id == principal.org_id)
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Document.name.ilike(f"%{escaped}%", escape="\\"))
    return page(session, query, Document.created_at.desc(), Document.id, offset=offset, limit=limit)


def get(session: Session, principal: Principal, document_id: str | uuid.UUID) -> Document:
    try:
        parsed = document_id if isinstance(document_id, uuid.UUID) else uuid.UUID(document_id)
    except ValueError:
        parsed = None
    found = (
        session.scalar(
            select(Document).where(Document.id == parsed, Document.org_id == principal.org_id)
        )
        if parsed is not None
        else None
    )
    if found is None:
        raise NotFound(f"no document {str(document_id)[:80]!r}", hint=LIST_HINT)
    return found


@dataclass(frozen=True)
class Content:
    """A document's bytes as the API answers them: in memory, or the file holding them."""

    document: Document
    data: bytes | None
    path: Any  # pathlib.Path when the bytes are on a filesystem


def content(session: Session, principal: Principal, document_id: str) -> Content:
    document = get(session, principal, document_id)
    data = session.scalar(select(Document.content).where(Document.id == document.id))
    if data is not None:
        return Content(document, data, None)
    path = storage.file_of(document.id)
    if not path.exists():
        raise NotFound(
            f"the bytes of document {document.id} are missing from {storage.PATH_SETTING}",
            hint=f"check that {storage.PATH_SETTING} names the same shared directory on every "
            "process; upload the document again otherwise",
        )
    return Content(document, None, path)


_IN_USE = text(
    f"""
    SELECT e.id, e.status FROM execution_documents ed
    JOIN executions e ON e.id = ed.execution_id
    WHERE ed.document_id = :document_id AND e.status NOT IN {FINISHED!r}
    LIMIT 1
    """
)


def delete(session: Session, principal: Principal, document_id: str) -> Document:
    """Delete a document no unfinished execution uses (409 otherwise), with its audit event;
    its file, if it has one, is the caller's to remove once this commits (storage.remove)."""
    principal.require("executions:submit")
    document = get(session, principal, document_id)
    # Locked first: a submit attaching it meanwhile (its foreign key takes a KEY SHARE lock)
    # either commits before, and is seen below, or waits and then finds it gone (422).
    session.execute(select(Document.id).where(Document.id == document.id).with_for_update()).one()
    using = session.execute(_IN_USE, {"document_id": document.id}).first()
    if using is not None:
        raise Conflict(
            f"document {document.name!r} is used by execution {using.id}, which is {using.status}",
            hint=f"delete it once the execution has finished (GET /api/v1/executions/{using.id}),"
            f" or cancel it (POST /api/v1/executions/{using.id}/cancel)",
        )
    session.delete(document)
    session.flush()
    audit.record(
        session,
        audit.Actor.of(principal),
        audit.Change(
            "document.delete",
            "document",
            document.id,
            document.name,
            [
                {"op": "remove", "path": f"/{key}", "value": getattr(document, key)}
                for key in ("size", "sha256")
            ],
        ),
    )
    return document


def present(document: Document) -> dict[str, Any]:
    return {
        "id": document.id,
        "name": document.name,
        "content_type": document.content_type,
        "size": document.size,
        "sha256": document.sha256,
        "created_at": document.created_at,
    }


# ---------------------------------------------------------------------------------------------
# Executions: attached at submit, listed on GET /executions/{id}, read by the worker


def _refuse_repeats(wanted: dict[uuid.UUID, list[uuid.UUID]], pointer: Pointer) -> None:
    errors: dict[str, list[str]] = {}
    for item, ids in enumerate(wanted.values()):
        if len(ids) > MAX_PER_EXECUTION:
            errors[pointer(item, None)] = [f"at most {MAX_PER_EXECUTION} documents"]
        seen: dict[uuid.UUID, int] = {}
        for number, document_id in enumerate(ids):
            if document_id in seen:
                errors[pointer(item, number)] = [
                    f"listed already at {pointer(item, seen[document_id])}"
                ]
            seen.setdefault(document_id, number)
    if errors:
        raise ValidationFailed(
            "the documents to attach are too many or listed twice",
            errors=errors,
            hint=f"list each document once, at most {MAX_PER_EXECUTION} per execution",
        )


# Pointer(item, number) -> the JSON pointer of an attached document of a submit (number None:
# the list itself): /documents/<n> for one execution, /items/<i>/documents/<n> for a batch.
Pointer = Callable[[int, int | None], str]


def single_pointer(_item: int, number: int | None) -> str:
    return "/documents" if number is None else f"/documents/{number}"


def batch_pointer(item: int, number: int | None) -> str:
    base = f"/items/{item}/documents"
    return base if number is None else f"{base}/{number}"


# One statement: the links of every execution of the submit to the organization's documents it
# names, answered with what each document is. A document missing (or another organization's)
# has no row in `found`, hence no link: the caller compares the counts.
_ATTACH = """
    WITH wanted AS (
        SELECT w.execution_id, w.position, w.document_id
        FROM json_to_recordset(%(links)s::json)
             AS w(execution_id uuid, position smallint, document_id uuid)
    ), found AS (
        SELECT w.execution_id, w.position, d.id, d.name, d.content_type, d.size
        FROM wanted w JOIN documents d ON d.id = w.document_id AND d.org_id = %(org_id)s
    ), linked AS (
        INSERT INTO execution_documents (execution_id, position, document_id, org_id)
        SELECT execution_id, position, id, %(org_id)s FROM found
    )
    SELECT execution_id, position, id, name, content_type, size FROM found
"""


Handed = dict[uuid.UUID, list[dict[str, Any]]]


def attaching(
    conn: Connection,
    org_id: uuid.UUID,
    wanted: dict[uuid.UUID, list[uuid.UUID]],
    pointer: Pointer = single_pointer,
) -> AbstractContextManager[Handed]:
    """Around the insert of a submit's executions (execution id -> the document ids it is
    handed, in order): when any has documents, the block and the links to them run in one
    transaction (a savepoint inside the caller's), and a document that is not the
    organization's refuses the whole submit with a 422 naming `pointer(item, n)`. Yields the
    documents each execution got (filled once the block is done). Nothing at all, not a
    statement, when no execution has documents: the submit's hot path stays as it is."""
    if not any(wanted.values()):
        return nullcontext({})
    _refuse_repeats(wanted, pointer)
    return _linked(conn, org_id, wanted, pointer)


@contextmanager
def _linked(
    conn: Connection,
    org_id: uuid.UUID,
    wanted: dict[uuid.UUID, list[uuid.UUID]],
    pointer: Pointer,
) -> Iterator[Handed]:
    attached: Handed = {}
    links = [
        {"execution_id": str(execution_id), "position": number, "document_id": str(document_id)}
        for execution_id, ids in wanted.items()
        for number, document_id in enumerate(ids)
    ]
    try:
        with driver(conn).transaction():
            yield attached
            rows = (
                driver(conn)
                .execute(_ATTACH, {"links": json.dumps(links), "org_id": org_id})
                .fetchall()
            )
            found = {(row[0], row[1]): row for row in rows}
            if len(found) < len(links):
                raise _unknown(wanted, found, pointer)
    except psycopg.errors.ForeignKeyViolation as exc:
        # Deleted between the statement's look and its link (see delete): as unknown.
        raise _unknown(wanted, {}, pointer) from exc
    for execution_id, ids in wanted.items():
        attached[execution_id] = [
            _shown(found[(execution_id, number)]) for number in range(len(ids))
        ]


def _shown(row: Any) -> dict[str, Any]:
    return {"id": row[2], "name": row[3], "content_type": row[4], "size": row[5]}


def _unknown(
    wanted: dict[uuid.UUID, list[uuid.UUID]], found: dict[tuple, Any], pointer: Pointer
) -> ValidationFailed:
    errors = {
        pointer(item, number): [f"no document {document_id} in your organization"]
        for item, (execution_id, ids) in enumerate(wanted.items())
        for number, document_id in enumerate(ids)
        if (execution_id, number) not in found
    }
    return ValidationFailed(
        "the submit names documents that do not exist in your organization: nothing was queued",
        errors=errors,
        hint="POST /api/v1/documents?name=... to upload them first; " + LIST_HINT,
    )


_ATTACHED = text(
    """
    SELECT d.id, d.name, d.content_type, d.size
    FROM execution_documents ed JOIN documents d ON d.id = ed.document_id
    WHERE ed.execution_id = :execution_id
    ORDER BY ed.position
    """
)


def attached(conn: Connection | Session, execution_id: uuid.UUID) -> list[dict[str, Any]]:
    """The documents an execution was handed, in the submit's order (one indexed read): what
    GET /executions/{id} shows and what the worker hands the agent as ctx.documents."""
    rows = conn.execute(_ATTACHED, {"execution_id": execution_id}).all()
    return [
        {"id": row.id, "name": row.name, "content_type": row.content_type, "size": row.size}
        for row in rows
    ]


_CONTENT = text(
    """
    SELECT d.content FROM execution_documents ed JOIN documents d ON d.id = ed.document_id
    WHERE ed.execution_id = :execution_id AND ed.document_id = :document_id
    LIMIT 1
    """
)


def content_of(conn: Connection, execution_id: uuid.UUID, document_id: uuid.UUID) -> Any:
    """The bytes of a document attached to the execution, or the file that holds them
    (a pathlib.Path); None when the execution has no such document."""
    row = conn.execute(_CONTENT, {"execution_id": execution_id, "document_id": document_id}).first()
    if row is None:
        return None
    return row.content if row.content is not None else storage.file_of(document_id)
