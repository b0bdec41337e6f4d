"""Process hardening shared by every Runyard process."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _prctl(option: int, value: int = 0) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return libc.prctl(option, value, 0, 0, 0)


def make_undumpable() -> None:
    """Keep agents' child processes out of this process's memory and environment.

    A `script` agent runs as the same user as the worker. Without this it could read
    /proc/<worker>/environ (DATABASE_URL with its password, the broker URL) or ptrace the
    worker. A non-dumpable process's /proc entries belong to root, so a process of the same
    unprivileged user cannot open them. Forked children inherit the flag; an exec (the agent's
    own child) does not. Root sees through it: run Runyard as an unprivileged user (the Docker
    image does).
    """
    if sys.platform == "linux":
        _prctl(PR_SET_DUMPABLE, 0)


def is_dumpable() -> bool:
    return sys.platform != "linux" or _prctl(PR_GET_DUMPABLE) == 1
