"""Where a document's bytes live: PostgreSQL (the `content` bytea column, the default) or a
directory shared by the API and every worker (RUNYARD_DOCUMENTS_PATH), as files named by id.

PostgreSQL by default: one system of record, the bytes commit in the same transaction as the
row that describes them (and the rows that refer to it), they are backed up with everything
else, and there is nothing more to run. That is fine up to the default limit of 20 MiB. For
larger files, point RUNYARD_DOCUMENTS_PATH at a volume or NFS mount that the API and the
workers share: an upload is written there (fsync'd, then renamed to its id) before its row
commits, and a delete removes the file once the row's delete has committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.config import current_config
from app.errors import RunyardError, Unavailable

CHUNK_BYTES = 1024 * 1024
PATH_SETTING = "RUNYARD_DOCUMENTS_PATH"
LIMIT_SETTING = "RUNYARD_MAX_DOCUMENT_MB"


class DocumentTooLarge(RunyardError):
    """413: the document is over RUNYARD_MAX_DOCUMENT_MB."""

    status_code = 413

    def __init__(self, max_bytes: int, size: int | None = None) -> None:
        megabytes = max_bytes // (1024 * 1024)
        said = f" ({size} bytes)" if size is not None else ""
        super().__init__(
            f"the document{said} is over the limit of {megabytes} MiB ({LIMIT_SETTING})",
            hint=f"send a smaller file, or raise {LIMIT_SETTING} on the API (for large files, "
            f"set {PATH_SETTING} too, so that their bytes live on a shared filesystem rather "
            "than in PostgreSQL)",
        )


@dataclass
class Received:
    """An upload read to its end: its size and sha256, and its bytes (PostgreSQL) or the
    temporary file holding them (a documents directory)."""

    size: int
    sha256: str
    content: bytes | None
    spooled: Path | None

    def discard(self) -> None:
        if self.spooled is not None:
            with contextlib.suppress(FileNotFoundError):
                self.spooled.unlink()


def directory() -> Path | None:
    """The documents directory, when the bytes of new documents go to files."""
    return current_config().documents_path


def _usable_directory(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Unavailable(
            f"the documents directory cannot be used: {exc.strerror}",
            hint=f"check that {PATH_SETTING} names a directory this process may write to",
        ) from exc
    return path


def receive(stream: BinaryIO, max_bytes: int) -> Received:
    """Read an upload to its end, hashing it as it comes; DocumentTooLarge past `max_bytes`."""
    target = directory()
    digest = hashlib.sha256()
    size = 0
    if target is None:
        buffer = io.BytesIO()
        sink: BinaryIO = buffer
        spooled = None
    else:
        spooled = _usable_directory(target) / f".upload-{uuid.uuid4().hex}"
        sink = open(spooled, "xb")  # noqa: SIM115 - closed below, removed on failure
    try:
        while chunk := stream.read(CHUNK_BYTES):
            size += len(chunk)
            if size > max_bytes:
                raise DocumentTooLarge(max_bytes)
            digest.update(chunk)
            sink.write(chunk)
        if spooled is not None:
            sink.flush()
            os.fsync(sink.fileno())
    except BaseException:
        sink.close()
        if spooled is not None:
            spooled.unlink(missing_ok=True)
        raise
    if spooled is not None:
        sink.close()
        return Received(size, digest.hexdigest(), None, spooled)
    return Received(size, digest.hexdigest(), buffer.getvalue(), None)


def keep(received: Received, document_id: uuid.UUID) -> None:
    """Give a spooled upload its final name (its id), before the row that names it commits."""
    if received.spooled is not None:
        os.replace(received.spooled, received.spooled.with_name(str(document_id)))
        received.spooled = None


def file_of(document_id: uuid.UUID | str) -> Path:
    """The file holding a document whose bytes are not in PostgreSQL."""
    target = directory()
    if target is None:
        raise Unavailable(
            f"document {document_id} is kept on a filesystem, and {PATH_SETTING} is not set "
            "in this process",
            hint=f"set {PATH_SETTING} to the same shared directory on the API and every worker",
        )
    return target / str(document_id)


def remove(document_id: uuid.UUID) -> None:
    """Remove a document's file (after its row's delete committed); nothing when it has none."""
    target = directory()
    if target is not None:
        with contextlib.suppress(FileNotFoundError):
            (target / str(document_id)).unlink()
