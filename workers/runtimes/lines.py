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
    the worker's memory without bound."""

    def __init__(self, emit: Callable[[str], None], max_bytes: int = 64 * 1024) -> None:
        self._emit = emit
        self._max_bytes = max_bytes
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        self._partial += chunk
        *lines, self._partial = self._partial.split(b"\n")
        while len(self._partial) > self._max_bytes:
            lines.append(self._partial[: self._max_bytes])
            self._partial = self._partial[self._max_bytes :]
        for line in lines:
            self._emit(line.decode("utf-8", "replace"))

    def close(self) -> None:
        if self._partial:
            self._emit(self._partial.decode("utf-8", "replace"))
            self._partial = b""
