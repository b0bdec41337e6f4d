"""Turning a stream of text into log lines."""

from __future__ import annotations

import io
from collections.abc import Callable


class LineWriter(io.TextIOBase):
    """A file object (for sys.stdout) that emits one log line per printed line."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = ""


class ByteLines:
    """Splits raw bytes from a pipe into decoded lines.

    A line longer than `max_bytes` is emitted in pieces, so output without newlines cannot grow
    the worker's memory without bound. Only each new chunk is searched for newlines, so a long
    line arriving in many chunks costs linear time."""

    def __init__(self, emit: Callable[[str], None], max_bytes: int = 64 * 1024) -> None:
        self._emit = emit
        self._max_bytes = max_bytes
        self._partial = bytearray()

    def feed(self, chunk: bytes) -> None:
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            self._partial += chunk[start:end]
            self._emit_partial()
            start = end + 1
        self._partial += chunk[start:]
        while len(self._partial) > self._max_bytes:
            piece = bytes(self._partial[: self._max_bytes])
            del self._partial[: self._max_bytes]
            self._emit(piece.decode("utf-8", "replace"))

    def _emit_partial(self) -> None:
        line = self._partial.decode("utf-8", "replace")
        self._partial = bytearray()
        self._emit(line)

    def close(self) -> None:
        if self._partial:
            self._emit_partial()
