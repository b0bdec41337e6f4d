"""The documents an execution was handed, as its agent sees them: `ctx.documents` and
`ctx.document(id)` (python agents), and the files a `script` or `command` child finds in
RUNYARD_DOCUMENTS_DIR.

No database here (the runtimes import this module): the reads go through a DocumentSource,
which the runner makes (workers/documents.py). Nothing is read until the agent asks: an
execution whose agent never touches its documents costs no statement.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

DOCUMENTS_DIR_ENV = "RUNYARD_DOCUMENTS_DIR"
SHOWN = ("id", "name", "content_type", "size")
MAX_FILE_NAME_BYTES = 200
# What a file name may not hold: path separators, NUL and control characters.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


class DocumentSource(Protocol):
    """Where an execution's documents come from (workers.documents.DocumentLoader)."""

    def attached(self) -> list[dict[str, Any]]:
        """The documents handed to the execution, in order: `SHOWN` keys, the id a str."""
        ...

    def read(self, document_id: str) -> bytes: ...

    def save(self, document_id: str, path: Path) -> None:
        """Write the document's bytes to a new file at `path`."""
        ...


class Document:
    """What `ctx.document(id)` returns: `id`, `name`, `content_type`, `size`, and the bytes
    through `read()` (read once, then kept) or `text()` (UTF-8 unless told)."""

    def __init__(self, shown: dict[str, Any], source: DocumentSource) -> None:
        self.id: str = shown["id"]
        self.name: str = shown["name"]
        self.content_type: str = shown["content_type"]
        self.size: int = shown["size"]
        self._source = source
        self._data: bytes | None = None

    def read(self) -> bytes:
        if self._data is None:
            self._data = self._source.read(self.id)
        return self._data

    def text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read().decode(encoding, errors)

    def __repr__(self) -> str:
        return f"<Document {self.id} {self.name!r} {self.content_type} {self.size} bytes>"


def safe_file_name(name: str, document_id: str, taken: set[str]) -> str:
    """A document's name as a file name in one directory: no separators or control characters,
    not hidden, at most MAX_FILE_NAME_BYTES of UTF-8, and unique in `taken` (a name met again
    gets the start of its document's id before its suffix)."""
    safe = _UNSAFE.sub("_", name).strip().lstrip(".") or "document"
    stem, dot, suffix = safe.rpartition(".")
    if not dot or not stem or len(suffix) > 16:
        stem, suffix = safe, ""
    suffix = f".{suffix}" if suffix else ""
    candidate = _cut(stem, MAX_FILE_NAME_BYTES - len(suffix.encode())) + suffix
    if candidate in taken:
        tail = f"-{document_id[:8]}{suffix}"
        candidate = _cut(stem, MAX_FILE_NAME_BYTES - len(tail.encode())) + tail
    if candidate in taken:  # two ids that start alike, with one name: the whole id
        candidate = f"{document_id}{suffix}"
    taken.add(candidate)
    return candidate


def _cut(text: str, max_bytes: int) -> str:
    return text.encode()[:max_bytes].decode(errors="ignore")


@dataclass
class HandedFiles:
    """An execution's documents written out for a child process: the directory (its
    environment: RUNYARD_DOCUMENTS_DIR) and what is in it (`SHOWN` keys and `file`)."""

    directory: Path
    documents: list[dict[str, Any]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {DOCUMENTS_DIR_ENV: str(self.directory)}

    def added_to(self, request: bytes) -> bytes:
        """A `script` child's request (JSON) with the list added, for its ctx.documents."""
        if not self.documents:
            return request
        return json.dumps({**json.loads(request), "documents": self.documents}).encode()


class HandedDocuments:
    """The documents of one execution, listed on first use only."""

    def __init__(self, source: DocumentSource | None) -> None:
        self._source = source
        self._listed: list[dict[str, Any]] | None = None

    def _all(self) -> list[dict[str, Any]]:
        if self._listed is None:
            self._listed = self._source.attached() if self._source is not None else []
        return self._listed

    def listed(self) -> list[dict[str, Any]]:
        """`ctx.documents`: copies, so an agent changing them changes nothing here."""
        return [{key: document[key] for key in SHOWN} for document in self._all()]

    def open(self, document_id: str) -> Document:
        """`ctx.document(id)`; LookupError for an id the execution was not handed."""
        wanted = str(document_id)
        for document in self._all():
            if document["id"] == wanted:
                assert self._source is not None
                return Document(document, self._source)
        handed = ", ".join(document["id"] for document in self._all()) or "none"
        raise LookupError(
            f"no document {wanted} was handed to this execution (handed: {handed}); list them "
            "in the submit's `documents`"
        )

    def write_files(self, directory: Path) -> HandedFiles:
        """Write every document into `directory` (made here), each under its name made safe."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        handed = HandedFiles(directory)
        taken: set[str] = set()
        for document in self._all():
            file_name = safe_file_name(document["name"], document["id"], taken)
            assert self._source is not None
            self._source.save(document["id"], directory / file_name)
            handed.documents.append({**{key: document[key] for key in SHOWN}, "file": file_name})
        return handed
