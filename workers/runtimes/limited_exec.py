"""Puts resource limits on itself, then becomes the agent's program (exec).

Run as `python -I -S limited_exec.py PROGRAM ARG...` with the limits as JSON in
RUNYARD_CHILD_LIMITS ({"RLIMIT_CPU": [soft, hard], ...}). Limits set here are inherited by the
program and everything it starts. This stands in for a `preexec_fn`, which is unsafe in the
worker: its pool processes run threads (the log writer, the watchdog), and a fork of a threaded
process may only call async-signal-safe functions before exec.

Standalone on purpose: it imports nothing of Runyard, so it starts in a few milliseconds.
"""

import json
import os
import resource
import signal
import sys


def main() -> None:
    limits = json.loads(os.environ.pop("RUNYARD_CHILD_LIMITS", "{}"))
    for name, (soft, hard) in limits.items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    # Python ignores these two; the program should get the default actions (SIGXFSZ ends a
    # program that writes past RLIMIT_FSIZE, as it would anywhere else).
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    argv = sys.argv[1:]
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"runyard: cannot run {argv[0]!r}: {exc.strerror}\n")
        sys.exit(127)


if __name__ == "__main__":
    main()
