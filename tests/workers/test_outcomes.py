"""The pool process's outcome writer (workers/outcomes.py): one outcome in flight at a time, in
its own thread where enabled (prefork pool processes), inline elsewhere; what follows a write
(the lease's release) runs whatever the write did. The live paths: tests/workers/test_runs.py
and the warm shutdown in tests/faults/test_worker_faults.py."""

from __future__ import annotations

import signal
import threading

import pytest

from workers.outcomes import OutcomeWriter


def test_inline_until_enabled_and_what_follows_runs_even_when_the_write_fails():
    writer = OutcomeWriter()
    calls = []
    writer.record(
        lambda: calls.append(("write", threading.get_ident())), lambda: calls.append("then")
    )
    assert calls == [("write", threading.get_ident()), "then"], "inline, in this thread, in order"

    def fails():
        raise RuntimeError("no database")

    with pytest.raises(RuntimeError):
        writer.record(fails, lambda: calls.append("then again"))
    assert calls[-1] == "then again"


def test_enabled_it_returns_at_once_and_the_next_one_waits_for_the_one_in_flight():
    writer = OutcomeWriter()
    writer.enable()
    release = threading.Event()
    order = []

    def first():
        assert release.wait(10)
        order.append("first")

    writer.record(first, lambda: order.append("first released"))
    assert order == [], "the caller did not wait for the write"

    second_recorded = threading.Event()

    def record_second():
        writer.record(lambda: order.append("second"), lambda: order.append("second released"))
        second_recorded.set()

    recorder = threading.Thread(target=record_second)
    recorder.start()
    assert not second_recorded.wait(0.3), "the second waits while the first is in flight"
    release.set()
    recorder.join(10)
    writer.wait()
    assert order == ["first", "first released", "second", "second released"]


def test_a_failed_background_write_is_logged_and_still_releases(caplog):
    writer = OutcomeWriter()
    writer.enable()
    released = threading.Event()

    def fails():
        raise RuntimeError("no database")

    writer.record(fails, released.set)
    writer.wait()  # does not raise: the failure is the log's and the lease's
    assert released.is_set()
    assert "an outcome could not be recorded" in caplog.text
    assert "RuntimeError: no database" in caplog.text


def test_an_interrupted_wait_keeps_the_outcome_in_flight():
    """Celery's soft time limit is a signal whose handler raises, at any line: one that lands
    in a wait leaves the outcome in flight, for the next wait (the process's exit) to wait for."""
    writer = OutcomeWriter()
    writer.enable()
    release = threading.Event()
    written = []
    writer.record(lambda: (release.wait(10), written.append(True)), lambda: None)

    class SoftLimit(Exception):
        pass

    def on_alarm(_signum, _frame):
        raise SoftLimit

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(SoftLimit):
            writer.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert writer._pending is not None, "still in flight"
    release.set()
    writer.wait()
    assert written == [True]


def test_inline_is_asked_for_a_chain_step_even_where_enabled():
    writer = OutcomeWriter()
    writer.enable()
    calls = []
    writer.record(lambda: calls.append(threading.get_ident()), lambda: None, inline=True)
    assert calls == [threading.get_ident()]
