"""Python agents the tests run (RUNYARD_AGENT_MODULES includes `tests.agents` in the suite)."""

import os
import time


def echo(payload, ctx):
    return {"echo": payload, "attempt": ctx.attempt, "agent": ctx.agent, "config": ctx.config}


def chatty(payload, ctx):
    print("first printed")
    ctx.log.info("then logged", step=2)
    print("then printed again")
    ctx.log.warning("a warning", step=4)
    ctx.log.debug("a debug line")
    return {"ok": True}


def boom(payload, ctx):
    raise RuntimeError("the agent blew up")


def not_an_object(payload, ctx):
    return ["a", "list"]


def wrong_output(payload, ctx):
    return {"count": "three"}


def flaky(payload, ctx):
    """Fails on the first attempts, succeeds on the attempt named in the input."""
    if ctx.attempt < payload["succeed_on"]:
        raise ConnectionError(f"transient failure on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


def wait_for_cancel(payload, ctx):
    deadline = time.monotonic() + payload.get("seconds", 20)
    while time.monotonic() < deadline:
        if ctx.cancelled():
            ctx.log.info("saw the cancel")
            raise RuntimeError("stopped on request")
        time.sleep(0.05)
    return {"finished": True}


def sleepy(payload, ctx):
    time.sleep(payload.get("seconds", 5))
    return {}


def ignores_cancel(payload, ctx):
    """Never looks at ctx.cancelled(): only the watchdog's interruption stops it."""
    time.sleep(payload.get("seconds", 30))
    return {"finished": True}


def stubborn(payload, ctx):
    """Swallows every interruption: only the watchdog's kill of its process ends it."""
    deadline = time.monotonic() + payload.get("seconds", 60)
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except BaseException:  # the point of this agent
            ctx.log.warning("swallowed an interruption")
    return {"finished": True}


def big_output(payload, ctx):
    return {"blob": "x" * payload["size"]}


def flood(payload, ctx):
    for number in range(payload["lines"]):
        print(f"line {number}")
    return {}


def add(payload, ctx):
    return {"value": payload["value"] + payload.get("by", 1)}


def late_boom(payload, ctx):
    time.sleep(payload.get("seconds", 0.3))
    raise RuntimeError("the agent blew up late")


def ledger(payload, ctx):
    """Sleeps, then appends `execution_id attempt` to the file named in the input: one line per
    time the agent's work ran to its end (tests/faults counts them)."""
    time.sleep(payload.get("seconds", 0.05))
    return _ledger_line(payload, ctx)


def logging_ledger(payload, ctx):
    """The ledger agent, logging while it sleeps: `lines` times one ctx.log.info and one print,
    the sleep spread between them, so 2 * `lines` log lines (tests/faults counts them)."""
    lines = payload.get("lines", 5)
    for step in range(lines):
        ctx.log.info("logged", step=step)
        print(f"printed {step}")
        time.sleep(payload.get("seconds", 0.05) / lines)
    return _ledger_line(payload, ctx)


def _ledger_line(payload, ctx):
    with open(payload["ledger"], "a") as ledger_file:
        ledger_file.write(f"{ctx.execution_id} {ctx.attempt}\n")
    return {"n": payload.get("n", 0)}


def integer_keys(payload, ctx):
    """Python dicts may have keys JSON writes as text."""
    return {"counts": {1: 5, 2: 7}}


def timed(payload, ctx):
    """Records when its work ran: sleeps `seconds` (stopping early, as cancelled, once a cancel
    is asked), then appends `execution_id attempt started ended customer` (time.time(), one clock
    for every worker process) to the file named in the input. The flow control tests read the
    lines to count how many ran at once."""
    started = time.time()
    deadline = time.monotonic() + payload.get("seconds", 0.05)
    while time.monotonic() < deadline:
        if ctx.cancelled():
            raise RuntimeError("stopped on request")
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    ended = time.time()
    with open(payload["ledger"], "a") as ledger_file:
        ledger_file.write(
            f"{ctx.execution_id} {ctx.attempt} {started:.6f} {ended:.6f} "
            f"{payload.get('customer')}\n"
        )
    return {"n": payload.get("n", 0)}


def fails_until_flag(payload, ctx):
    """Fails while the file named `flag` in the input does not exist, then succeeds with the
    `value` it got (a chain step that fails once and passes on a rerun with the same input)."""
    if not os.path.exists(payload["flag"]):
        raise RuntimeError("the flag file is not there yet")
    return {"value": payload.get("value", 0)}


def reporter(payload, ctx):
    """Logs numbered lines with pauses, reporting progress after each; returns the trace context
    it was handed and what ctx.progress said to a fraction out of range."""
    lines = payload.get("lines", 5)
    for number in range(lines):
        ctx.log.info(f"line {number}")
        ctx.progress((number + 1) / lines, f"line {number} of {lines}")
        time.sleep(payload.get("pause", 0.2))
    try:
        ctx.progress(1.5)
        refused = None
    except ValueError as exc:
        refused = str(exc)
    return {"traceparent": ctx.traceparent, "refused": refused}


# ---------------------------------------------------------------------------------------------
# Durable agents (tests/workers/test_durable.py)


def double(payload, ctx):
    return {"n": payload["n"] * 2}


def fan_out(payload, ctx):
    """Starts `count` children of `child` and gathers their outputs."""
    ids = [ctx.start(payload["child"], {"n": n}) for n in range(payload["count"])]
    outputs = ctx.wait(ids)
    return {"total": sum(output["n"] for output in outputs), "children": len(ids)}


def run_child(payload, ctx):
    """ctx.run, catching ChildFailed when asked to."""
    from workers.context import ChildFailed

    try:
        return {"output": ctx.run(payload["child"], payload.get("input", {}))}
    except ChildFailed as exc:
        if not payload.get("catch"):
            raise
        return {"failed": exc.as_dict()}


def step_ledger(payload, ctx):
    """Appends a line per step to a file, pausing between steps (for a kill to land there)."""
    path = payload["path"]

    def write(line):
        with open(path, "a") as ledger_file:
            ledger_file.write(line + "\n")
        return line

    for step in range(payload["steps"]):
        ctx.step(f"write-{step}", write, f"step {step}")
        time.sleep(payload.get("pause", 0))
    return {"attempt": ctx.attempt}


def sleeper(payload, ctx):
    before = ctx.step("before", time.time)
    ctx.sleep(payload["seconds"])
    return {"slept": time.time() - before}


def waits_for_event(payload, ctx):
    data = ctx.wait_for_event(
        payload["event"],
        match=payload.get("match"),
        timeout_seconds=payload.get("timeout", 3600),
        lookback_seconds=payload.get("lookback", 0),
    )
    return {"data": data}


def changes_its_calls(payload, ctx):
    """Nondeterministic: the first run steps, the replay starts a child at the same place."""
    if ctx.attempt == 1 and not os.path.exists(payload["marker"]):
        open(payload["marker"], "w").close()
        ctx.step("first", lambda: 1)
        ctx.sleep(1)
    ctx.start("double", {"n": 1})
    return {}


def counter(payload, ctx):
    """Adds one to the state key `count` by compare-and-set, trying again on a conflict."""
    from workers.context import StateConflict

    while True:
        entry = ctx.state.entry("count")
        value, version = (entry["value"], entry["version"]) if entry else (0, 0)
        try:
            ctx.state.set("count", value + 1, expected_version=version)
            return {"count": value + 1}
        except StateConflict:
            continue


def read_documents(payload, ctx):
    """Returns what ctx.documents lists, the sha256 of each document's bytes, the first one's
    text, and what ctx.document says of an id the execution was not handed."""
    import hashlib

    listed = ctx.documents
    try:
        ctx.document("00000000-0000-0000-0000-000000000000")
        refused = None
    except LookupError as exc:
        refused = str(exc)
    return {
        "documents": listed,
        "sha256": [hashlib.sha256(ctx.document(d["id"]).read()).hexdigest() for d in listed],
        "text": ctx.document(listed[0]["id"]).text() if listed else None,
        "refused": refused,
    }


def retries_a_step(payload, ctx):
    """A step whose function fails once, tried again in a loop, then a sleep (a replay)."""
    marker = payload["marker"]

    def flaky():
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise ValueError("first try")
        return "second try"

    while True:
        try:
            value = ctx.step("flaky", flaky)
            break
        except ValueError:
            continue
    ctx.sleep(1)
    return {"value": value, "after": ctx.step("after", lambda: "done")}


def pays(payload, ctx):
    """ctx.wallet.transfer as the input says; a refusal is the output, not a failure."""
    from workers.context import TransferRefused

    try:
        paid = ctx.wallet.transfer(
            payload["chain"], payload["to"], payload["amount"], payload.get("reason", "test")
        )
    except TransferRefused as refused:
        return {"refused": refused.reason, "decision": refused.decision.get("id")}
    return {"paid": paid, "address": ctx.wallet.address}
