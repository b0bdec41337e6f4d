"""The reads behind ctx.documents and ctx.document(id): the execution's documents, on the
attempt's connection (workers/context_documents.py is the side the agent sees)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from app.documents import services as documents
from workers.attempt import AttemptDatabase


class DocumentLoader:
    """A DocumentSource for one execution. One indexed read lists its documents; each
    document's bytes are one more read (from PostgreSQL, or the file in
    RUNYARD_DOCUMENTS_PATH), only of a document the execution was handed."""

    def __init__(self, database: AttemptDatabase, execution_id: uuid.UUID) -> None:
        self._database = database
        self._execution_id = execution_id

    def attached(self) -> list[dict[str, Any]]:
        with self._database.connection() as conn:
            listed = documents.attached(conn, self._execution_id)
        return [{**document, "id": str(document["id"])} for document in listed]

    def _content(self, document_id: str) -> bytes | Path:
        with self._database.connection() as conn:
            found = documents.content_of(conn, self._execution_id, uuid.UUID(document_id))
        if found is None:
            raise LookupError(f"document {document_id} is no longer there (deleted)")
        return found if isinstance(found, Path) else bytes(found)

    def read(self, document_id: str) -> bytes:
        found = self._content(document_id)
        return found.read_bytes() if isinstance(found, Path) else found

    def save(self, document_id: str, path: Path) -> None:
        found = self._content(document_id)
        if isinstance(found, Path):
            shutil.copyfile(found, path)
        else:
            path.write_bytes(found)
