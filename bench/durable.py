#!/usr/bin/env python
"""Durable agents: fan-out and gather against a plain Celery chord, and resumes from events.

    .venv/bin/python bench/durable.py [--children 100] [--runs 5] [--sleep-ms 10]
                                      [--concurrency 2] [--events 50]

Fan-out: a `python` parent starts `--children` children of an agent that sleeps `--sleep-ms`
(ctx.start) and waits for them all (ctx.wait): it waits holding no worker, and each child's end
is written into its journal; the last one queues it again. Time = the client's clock just before
the submit -> the parent's stored `finished_at`. Plain Celery: `chord(group of --children sleep
tasks, gather)` on the same pool; time = just before apply_async -> the callback's stored
`date_done`. Both sides are up at once and alternate (one warm-up each). It exits 2 when the
ratio of the medians misses the target (<= 2).

Resume: `--events` executions each wait for an event (ctx.wait_for_event with a match); each
waits, then an event is POSTed and the latency is the event's stored `received_at` -> the log
line the agent writes once it runs again. It prints p50 and p99.

Servers as bench/chain.py: DATABASE_URL set -> a fresh database on it, else embedded PostgreSQL;
Redis is an embedded instance of its own. Every process runs in its own session and is killed
with its process group at exit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.chain import (  # noqa: E402 - after the sys.path fix above
    Plain,
    Runyard,
    Side,
    bench_env,
    loadavg,
    setup_database,
    setup_redis,
)
from bench.throughput import LOG_DIR, BenchError, Children, log  # noqa: E402

TARGET_RATIO = 2.0
POLL_SECONDS = 0.01


class RunyardFanOut(Runyard):
    name = "runyard"

    def __init__(self, args, children: Children, env, database_url: str) -> None:
        args.steps = 1  # the chain bench's agent `sleeper` and its chain: unused here
        super().__init__(args, children, env, database_url)
        self.args = args
        self.api.post(
            "/api/v1/agents",
            {
                "name": "fanout",
                "runtime": {"type": "python", "entrypoint": "bench.plain_chain:fan_out"},
            },
        )
        self.api.post(
            "/api/v1/agents",
            {
                "name": "waiter",
                "runtime": {"type": "python", "entrypoint": "bench.plain_chain:resumes_on_event"},
            },
        )

    def one(self) -> float:
        t0 = time.time()
        body = {"input": {"child": "sleeper", "count": self.args.children}}
        execution = self.api.post("/api/v1/agents/fanout/executions", body)
        return self._finished(execution["id"]) - t0

    def _finished(self, execution_id: str) -> float:
        deadline = time.monotonic() + self.args.timeout
        while True:
            status, finished = self.poll.execute(
                "SELECT status, extract(epoch FROM finished_at)::float8 FROM executions "
                "WHERE id = %s",
                (execution_id,),
            ).fetchone()
            if status == "succeeded":
                return finished
            if status in ("failed", "timed_out", "cancelled"):
                raise BenchError(f"the parent {execution_id} ended {status}")
            self.children.check("runyard-worker")
            if time.monotonic() > deadline:
                raise BenchError(f"the parent did not finish within {self.args.timeout} s")
            time.sleep(POLL_SECONDS)

    def resumes(self, count: int) -> list[float]:
        """Seconds from each event's received_at to its waiter's `resumed` log line."""
        latencies = []
        for _ in range(count):
            key = uuid.uuid4().hex
            execution = self.api.post(
                "/api/v1/agents/waiter/executions", {"input": {"event": "bench.go", "key": key}}
            )
            self._wait_status(execution["id"], "waiting")
            event = self.api.post("/api/v1/events", {"name": "bench.go", "data": {"key": key}})
            self._finished(execution["id"])
            (seconds,) = self.poll.execute(
                "SELECT extract(epoch FROM l.ts - e.received_at)::float8 "
                "FROM execution_logs l, events e "
                "WHERE l.execution_id = %s AND l.message = 'resumed' AND e.event_id = %s",
                (execution["id"], event["id"]),
            ).fetchone()
            latencies.append(seconds)
        return latencies

    def _wait_status(self, execution_id: str, wanted: str) -> None:
        deadline = time.monotonic() + self.args.timeout
        while (
            self.poll.execute(
                "SELECT status FROM executions WHERE id = %s", (execution_id,)
            ).fetchone()[0]
            != wanted
        ):
            if time.monotonic() > deadline:
                raise BenchError(f"{execution_id} never became {wanted}")
            time.sleep(POLL_SECONDS)


class PlainChord(Plain):
    name = "plain celery"

    def one(self) -> float:
        from celery import chord

        from bench.plain_chain import gather, sleep_task

        header = [sleep_task.si(self.args.sleep_ms) for _ in range(self.args.children)]
        t0 = time.time()
        result = chord(header)(gather.s())
        key = f"celery-task-meta-{result.id}"
        deadline = time.monotonic() + self.args.timeout
        while True:
            raw = self.client.get(key)
            if raw:
                meta = json.loads(raw)
                if meta["status"] != "SUCCESS" or meta["result"] != self.args.children:
                    raise BenchError(f"the chord ended {meta['status']}: {meta['result']}")
                done = dt.datetime.fromisoformat(meta["date_done"])
                if done.tzinfo is None:
                    done = done.replace(tzinfo=dt.UTC)
                # Drops the backend's subscription to it now, while its Redis still runs.
                result.forget()
                return done.timestamp() - t0
            self.children.check("plain-worker")
            if time.monotonic() > deadline:
                raise BenchError(f"the chord did not finish within {self.args.timeout} s")
            time.sleep(POLL_SECONDS)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--children", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5, help="measured fan-outs per side")
    parser.add_argument("--sleep-ms", type=int, default=10, help="each child sleeps this long")
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    parser.add_argument("--events", type=int, default=50, help="resumes from events measured")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    args = parser.parse_args(argv)

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)
    cleanups: list[Callable[[], None]] = []
    children = Children()
    status = 0
    try:
        log(
            f"durable: a parent gathering {args.children} children sleeping {args.sleep_ms} ms "
            f"vs a plain chord, {args.runs} runs per side after one warm-up, worker -P prefork "
            f"-c {args.concurrency}, {os.cpu_count()} CPUs, load average {loadavg()}; "
            f"logs in {LOG_DIR}"
        )
        database_url = setup_database(cleanups)
        redis_url = setup_redis(cleanups)
        env = bench_env(database_url, redis_url)
        runyard = RunyardFanOut(args, children, env, database_url)
        plain = PlainChord(args, children, env, redis_url.rsplit("/", 1)[0] + "/1")
        sides: tuple[Side, ...] = (runyard, plain)
        try:
            time.sleep(3)
            for side in sides:
                side.one()
            for _ in range(args.runs):
                for side in sides:
                    side.measured()
            latencies = runyard.resumes(args.events) if args.events else []
        finally:
            for side in sides:
                side.close()
        for side in sides:
            log(f"{side.name}:")
            log(side.report(args.children))
        log("")
        ours, theirs = statistics.median(runyard.times), statistics.median(plain.times)
        log(f"runyard      median {ours:.3f} s, best {min(runyard.times):.3f} s")
        log(f"plain celery median {theirs:.3f} s, best {min(plain.times):.3f} s")
        log(f"ratio {ours / theirs:.2f} (target <= {TARGET_RATIO}); load average now {loadavg()}")
        if latencies:
            log(
                f"resume from an event ({len(latencies)}): p50 "
                f"{percentile(latencies, 0.5) * 1000:.1f} ms, p99 "
                f"{percentile(latencies, 0.99) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
            )
        if ours / theirs > TARGET_RATIO:
            log(f"MISSED: the ratio is above the target {TARGET_RATIO}")
            status = 2
    except BenchError as exc:
        log(f"FAILED: {exc}")
        status = 1
    finally:
        children.stop_all()
        for cleanup in reversed(cleanups):
            cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
