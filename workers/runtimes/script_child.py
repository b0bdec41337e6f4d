"""Runs a `script` agent's source in a child process. Started by workers/runtimes/script.py.

Standalone on purpose: it imports nothing of Runyard, so the child starts fast and sees none of
the worker's settings or secrets. Protocol: the request (source, input, ctx) arrives as JSON on
stdin; JSON lines go back on the file descriptor named by RUNYARD_CONTROL_FD:
{"log": [level, message, fields]} and {"progress": [fraction, message]}, durable calls as
{"call": [op, args]} (each answered by one JSON line on RUNYARD_REPLY_FD), then
{"output": ...}, {"error": {"type", "message"}} or {"suspended": true}. The documents the
execution was handed are files in RUNYARD_DOCUMENTS_DIR, listed in the request's `documents`
(ctx.documents, ctx.document(id)).
"""

import errno
import json
import os
import signal
import sys
import traceback

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def peak_rss_kb() -> int:
    """This process's peak resident size. Read here, because the parent's wait4() figure carries
    over the worker's own peak from before the exec."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class Log:
    """ctx.log: each call is one log line on the control channel."""

    def __init__(self, send):
        self._send = send

    def _emit(self, level, message, fields):
        sys.stdout.flush()
        sys.stderr.flush()
        self._send({"log": [LEVELS[level], str(message), fields]})

    def debug(self, message, **fields):
        self._emit("debug", message, fields)

    def info(self, message, **fields):
        self._emit("info", message, fields)

    def warning(self, message, **fields):
        self._emit("warning", message, fields)

    def error(self, message, **fields):
        self._emit("error", message, fields)


class LogLines:
    """sys.stdout / sys.stderr: each printed line travels on the control channel, so prints
    and ctx.log arrive in the order they happened. Output of subprocesses the script starts
    still goes to the real descriptors 1 and 2, which the worker also reads."""

    def __init__(self, send, level):
        self._send = send
        self.level = level
        self.partial = ""

    def write(self, text):
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self._send({"log": [self.level, line, None]})
        return len(text)

    def flush(self):
        if self.partial:
            self._send({"log": [self.level, self.partial, None]})
            self.partial = ""

    def isatty(self):
        return False


class Suspended(BaseException):
    """The worker says the run must wait (a child, a sleep, an event): unwind and end."""


class Nondeterministic(BaseException):
    """The worker says this run's durable calls differ from the journal's."""


class ChildFailed(Exception):
    """A child execution did not succeed (ctx.run, ctx.wait)."""

    def __init__(self, message, child):
        super().__init__(message)
        self.execution_id = child["execution_id"]
        self.agent = child["agent"]
        self.status = child["status"]
        self.error = child["error"]

    def as_dict(self):
        return {
            "execution_id": self.execution_id,
            "agent": self.agent,
            "status": self.status,
            "error": self.error,
        }


class StateConflict(Exception):
    """ctx.state.set with an expected_version that is not the key's version."""


class TransferRefused(Exception):
    """ctx.wallet.transfer was refused or rejected: nothing left the wallet."""

    def __init__(self, reason, decision=None):
        super().__init__(reason)
        self.reason = reason
        self.decision = decision or {}


ERRORS = {"StateConflict": StateConflict, "TypeError": TypeError, "ValueError": ValueError}


class Calls:
    """Durable calls: a request line on the control channel, the worker's answer on the reply
    descriptor (RUNYARD_REPLY_FD)."""

    def __init__(self, send, replies):
        self._send = send
        self._replies = replies

    def __call__(self, op, *args):
        sys.stdout.flush()
        sys.stderr.flush()
        self._send({"call": [op, list(args)]})
        reply = json.loads(self._replies.readline())
        if "ok" in reply:
            return reply["ok"]
        if reply.get("suspend"):
            raise Suspended()
        if "nondeterministic" in reply:
            raise Nondeterministic(reply["nondeterministic"])
        if reply.get("raise") == "ChildFailed":
            raise ChildFailed(reply["message"], reply["child"])
        if reply.get("raise") == "TransferRefused":
            raise TransferRefused(reply["message"], reply.get("decision"))
        raise ERRORS.get(reply.get("raise"), RuntimeError)(reply.get("message"))


class State:
    """ctx.state, answered by the worker."""

    def __init__(self, call):
        self._call = call

    def get(self, key, default=None):
        return self._call("state.get", key, default)

    def entry(self, key):
        return self._call("state.entry", key)

    def set(self, key, value, expected_version=None):
        return self._call("state.set", key, value, expected_version)

    def delete(self, key):
        return self._call("state.delete", key)


class Wallet:
    """ctx.wallet, answered by the worker (workers/context_wallet.py runs the transfer)."""

    def __init__(self, call):
        self._call = call

    @property
    def address(self):
        return self._call("wallet.address")

    def transfer(self, chain, to, amount, reason):
        if isinstance(amount, float):
            raise TypeError("ctx.wallet.transfer(amount): pass a decimal string, not float")
        return self._call("wallet.transfer", chain, to, str(amount), reason)


class Ctx:
    """The `ctx` of main(input, ctx): the execution, the agent's config, a log, progress, the
    trace context, whether a cancel was asked for, and the durable calls."""

    def __init__(self, request_ctx, log, cancel_requests, send, call):
        self.execution_id = request_ctx["execution_id"]
        self.attempt = request_ctx["attempt"]
        self.agent = request_ctx["agent"]
        self.config = request_ctx["config"]
        self.traceparent = request_ctx.get("traceparent")
        self.log = log
        self._cancel_requests = cancel_requests
        self._send = send
        self._call = call
        self.state = State(call)
        self.wallet = Wallet(call)

    def step(self, name, fn, *args):
        found, seq, result = self._call("step.begin", name)
        if found:
            return result
        try:
            value = fn(*args)
        except BaseException:
            self._call("step.abandon", seq)  # not recorded: a step tried again takes its number
            raise
        return self._call("step.record", seq, name, value)

    def start(self, agent, input, version=None):
        return self._call("start", agent, input, version)

    def wait(self, ids):
        return self._call("wait", list(ids))

    def run(self, agent, input, version=None):
        return self.wait([self.start(agent, input, version)])[0]

    def sleep(self, seconds):
        self._call("sleep", seconds)

    def sleep_until(self, when):
        self._call("sleep_until", when if isinstance(when, str) else when.isoformat())

    def wait_for_event(self, name, match=None, timeout_seconds=3600, lookback_seconds=0):
        return self._call("wait_for_event", name, match, timeout_seconds, lookback_seconds)

    def cancelled(self):
        return bool(self._cancel_requests)

    def progress(self, fraction, message=None):
        """How far the script is (0..1), and optionally what it does. The worker checks it
        again and throttles the writes; a bad value raises here, in the script."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TypeError(
                "ctx.progress(fraction): fraction must be a number from 0 to 1, "
                f"not {type(fraction).__name__}"
            )
        if fraction != fraction or not 0 <= fraction <= 1:
            raise ValueError(
                f"ctx.progress(fraction): fraction must be from 0 to 1, got {fraction!r}"
            )
        if message is not None and not isinstance(message, str):
            raise TypeError("ctx.progress(message=): message must be a string or None")
        sys.stdout.flush()
        self._send({"progress": [fraction, message]})


class Document:
    """What ctx.document(id) returns: `id`, `name`, `content_type`, `size`, `path` (its file in
    RUNYARD_DOCUMENTS_DIR), and the bytes through read() or text()."""

    def __init__(self, shown, path):
        self.id = shown["id"]
        self.name = shown["name"]
        self.content_type = shown["content_type"]
        self.size = shown["size"]
        self.path = path

    def read(self):
        with open(self.path, "rb") as handle:
            return handle.read()

    def text(self, encoding="utf-8", errors="strict"):
        return self.read().decode(encoding, errors)

    def __repr__(self):
        return f"<Document {self.id} {self.name!r} {self.content_type} {self.size} bytes>"


def hand_documents(ctx, handed):
    """Give the script's ctx its documents: ctx.documents (a list of {"id", "name",
    "content_type", "size"}) and ctx.document(id)."""
    directory = os.environ.get("RUNYARD_DOCUMENTS_DIR", "")
    ctx.documents = [
        {key: d[key] for key in ("id", "name", "content_type", "size")} for d in handed
    ]
    files = {d["id"]: Document(d, os.path.join(directory, d["file"])) for d in handed}

    def document(document_id):
        found = files.get(str(document_id))
        if found is None:
            raise LookupError(
                f"no document {document_id} was handed to this execution (handed: "
                f"{', '.join(files) or 'none'}); list them in the submit's `documents`"
            )
        return found

    ctx.document = document


# What run_script returns when the script gave no output: it failed, and said so already.
NO_OUTPUT = object()


def run_script(request: dict, ctx: Ctx, send):
    """The value the script's main(input, ctx) returns, or NO_OUTPUT once its error is sent."""
    namespace = {
        "__name__": "runyard_script",
        "ChildFailed": ChildFailed,
        "StateConflict": StateConflict,
        "TransferRefused": TransferRefused,
    }
    try:
        exec(compile(request["source"], "<agent script>", "exec"), namespace)
        entry = namespace.get("main")
        if not callable(entry):
            send(
                {
                    "error": {
                        "type": "runtime_error",
                        "message": "the script defines no main(input, ctx) function",
                    }
                }
            )
            return NO_OUTPUT
        return entry(request["input"], ctx)
    except Suspended:
        send({"suspended": True})
        return NO_OUTPUT
    except Nondeterministic as exc:
        send({"error": {"type": "nondeterministic", "message": str(exc)}})
        return NO_OUTPUT
    except BaseException as exc:
        sys.stdout.flush()
        # Drop this runner's own frame: the user's traceback starts in their script.
        trace = traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next)
        ctx.log.error("".join(trace).rstrip())
        send(
            {"error": {"type": error_type(exc, request), "message": f"{type(exc).__name__}: {exc}"}}
        )
        return NO_OUTPUT


def send_output(control, send, output, max_output_bytes: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        text = json.dumps({"output": output})
    except (TypeError, ValueError) as exc:
        send({"error": {"type": "output_invalid", "message": f"output is not JSON: {exc}"}})
        return
    # The output line is bounded here, before it crosses the pipe.
    if len(text) > max_output_bytes:
        message = f"the output is {len(text)} bytes, over {max_output_bytes}"
        send({"error": {"type": "output_too_large", "message": message}})
        return
    control.write(text + "\n")


def main() -> None:
    # closefd=False: the usage line is written on this descriptor after main() returns.
    control = os.fdopen(int(os.environ["RUNYARD_CONTROL_FD"]), "w", buffering=1, closefd=False)
    request = json.loads(sys.stdin.buffer.read())
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the agent gets an empty stdin for its lifetime

    def send(message: dict) -> None:
        # Log fields are best effort (repr of what JSON cannot hold); the output is not.
        control.write(json.dumps(message, default=repr) + "\n")

    sys.stdout = LogLines(send, LEVELS["info"])
    sys.stderr = LogLines(send, LEVELS["warning"])
    cancel_requests = []
    signal.signal(signal.SIGUSR1, lambda *_: cancel_requests.append(True))
    replies = os.fdopen(int(os.environ["RUNYARD_REPLY_FD"]), "r", closefd=True)
    ctx = Ctx(request["ctx"], Log(send), cancel_requests, send, Calls(send, replies))
    hand_documents(ctx, request.get("documents", []))
    output = run_script(request, ctx, send)
    if output is not NO_OUTPUT:
        send_output(control, send, output, request["max_output_bytes"])


def error_type(exc: BaseException, request: dict) -> str:
    """A limit the kernel enforced shows up in Python as an exception: name the limit."""
    if isinstance(exc, MemoryError) and request.get("memory_limited"):
        return "memory_limit"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "file_size_limit"
    return "runtime_error"


if __name__ == "__main__":
    try:
        main()
    finally:
        with open(int(os.environ["RUNYARD_CONTROL_FD"]), "w", closefd=False) as control_fd:
            control_fd.write(json.dumps({"usage": {"max_rss_kb": peak_rss_kb()}}) + "\n")
