#!/usr/bin/env python
"""Fairness: one organization's backlog against another organization's trickle of executions.

    .venv/bin/python bench/fairness.py [--a-count 3000] [--b-count 50] [--b-rate 5]
                                       [--a-batch-size 0] [--a-threads 4] [--concurrency 2]
                                       [--scenarios on,off,plain] [--fair-window N]

Each scenario, on an empty queue with organizations of its own: organization A submits
--a-count executions of a `python` agent that sleeps --sleep-ms (10), as fast as --a-threads
client threads can (single submits by default; --a-batch-size 100 uses the batch endpoint,
100 items a request). As soon as A's submits are all answered, organization B submits --b-count
executions of the same agent, one by one, at --b-rate a second (paced by the clock, from a pool
of threads, so a slow answer does not slow the pace). When all of B's have finished, each is read
with GET /api/v1/executions/{id}: B's queue wait = started_at - queued_at; the bench prints its
median, p90, p99 and max (nearest rank), then waits for A's backlog to drain before the next
scenario starts.

Scenarios, each with its own `runyard api`, `celery -A workers worker` (the worker settings of
bench/throughput.py: -P prefork -c --concurrency -Q default) and `celery -A workers beat` (the
sweeper, as `runyard up` runs it; --no-beat leaves it out):

- on: flow control as configured by default (RUNYARD_FAIR_WINDOW unset; --fair-window N sets it);
- off: RUNYARD_FAIR_WINDOW=0 in the API's, worker's and beat's environment: first in, first out
  across organizations;
- plain: plain Celery (`celery -A bench.plain_fairness worker`, same pool and Redis): A's tasks
  then B's on one queue, B's wait = the task's clock at its start - the client's clock at
  apply_async.

Target: B's p99 at most 1 s with flow control on; the exit status is 2 when it is missed, 1 when
a scenario failed.

Servers: DATABASE_URL set -> a fresh database `runyard_bench_fair` on that server (dropped at
the end unless --keep-db); unset -> embedded PostgreSQL under .runyard/bench-pg. REDIS_URL set ->
its server with database --redis-db or the next one no test run or benchmark holds (FLUSHDB
before each scenario); unset -> embedded Redis. Every process it starts runs in its own session
and is killed with its process group at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import (  # noqa: E402 - after the sys.path fix above
    BIN,
    HOME,
    LOG_DIR,
    Batch,
    BenchError,
    Children,
    HttpSubmit,
    flushdb,
    free_port,
    libpq_url,
    log,
    setup_redis,
    wait_http,
    worker_argv,
)
from bench.throughput import setup_database as bench_database  # noqa: E402

DATABASE = "runyard_bench_fair"
AGENT = "sleeper"
ENTRYPOINT = "bench.plain_fairness:sleep_agent"
AGENT_MODULES = "runyard_examples,bench.plain_fairness"
TERMINAL = ("succeeded", "failed", "timed_out", "cancelled")
TARGET_P99 = 1.0  # seconds: B's p99 queue wait with flow control on
POLL_SECONDS = 0.1
# The sweeper's marker in the broker's Redis (app/broker MARKER_KEY): its first sweep sets it,
# and republishes every queued row once (it cannot tell a new Redis from a flushed one). The
# bench waits for that sweep before A submits, so A's backlog is not published twice.
MARKER_KEY = "runyard:broker-marker"
LABELS = {"on": "flow control on", "off": "off (FIFO)", "plain": "plain celery"}


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def parse_time(value: str) -> float:
    stamp = dt.datetime.fromisoformat(value)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


@dataclass
class Result:
    """One scenario's figures."""

    name: str
    how_a: str = ""
    a_submit_seconds: float = 0.0
    a_backlog: int = 0  # A's items not yet started when B's first submit went out
    a_drain_seconds: float = 0.0  # A's first submit -> A's last item finished
    b_waits: list[float] = field(default_factory=list)
    b_latencies: list[float] = field(default_factory=list)  # B's submit round trips
    b_span: float = 0.0  # B's first submit -> last submit answered


# ---------------------------------------------------------------------------------------------
# Servers and organizations


def setup_database(cleanups: list[Callable[[], None]], keep: bool) -> str:
    """A fresh `runyard_bench_fair` database at the schema's head; returns its SQLAlchemy URL."""
    from app.migrate import upgrade

    url = bench_database(cleanups, keep, database=DATABASE)
    upgrade(url)
    return url


def create_orgs(database_url: str, names: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (org id, admin token), for organizations created now."""
    from app.db import db
    from app.orgs import services

    db.configure(database_url)
    try:
        with db.session() as session:
            made = {}
            for name in names:
                org, token = services.create_org(session, name)
                made[name] = (str(org.id), token)
            session.commit()
            return made
    finally:
        db.dispose()


class Api:
    """A connection per request: the API closes idle keep-alive connections within seconds."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }

    def call(self, method: str, path: str, body: dict | None = None, expect: int = 200) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, payload, self.headers)
            response = conn.getresponse()
            data = json.loads(response.read() or b"null")
        finally:
            conn.close()
        if response.status != expect:
            raise BenchError(f"{method} {path} answered {response.status}: {str(data)[:300]}")
        return data


def paced(n: int, rate: float, call: Callable[[], object]) -> tuple[list, list[float], float]:
    """`n` calls at `rate` a second by the clock, from a pool of threads; returns the results in
    order, each call's round trip, and the seconds from the first call to the last answer."""
    pool_size = max(4, min(32, math.ceil(rate)))

    def timed(_i: int) -> tuple[object, float]:
        t = time.monotonic()
        result = call()
        return result, time.monotonic() - t

    futures = []
    with ThreadPoolExecutor(max_workers=pool_size) as pool:
        t0 = time.monotonic()
        for i in range(n):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(timed, i))
        done = [f.result() for f in futures]
    span = time.monotonic() - t0
    return [r for r, _ in done], [lat for _, lat in done], span


def wait_for(what: str, done: Callable[[], bool], deadline: float, alive: Callable[[], None]):
    while not done():
        alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not done within the scenario's --timeout")
        time.sleep(POLL_SECONDS)


# ---------------------------------------------------------------------------------------------
# Runyard, flow control on or off


def scenario_runyard(
    args,
    name: str,
    children: Children,
    base_env: dict[str, str],
    database_url: str,
    redis_url: str,
) -> Result:
    import psycopg
    import redis
    from sqlalchemy.engine import make_url

    result = Result(name)
    deadline = time.monotonic() + args.timeout
    flushdb(redis_url)
    poll = psycopg.connect(libpq_url(make_url(database_url)), autocommit=True)
    broker = redis.Redis.from_url(redis_url)
    try:
        left = poll.execute(
            "SELECT count(*) FROM executions WHERE status <> ALL(%s)", (list(TERMINAL),)
        ).fetchone()[0]
        if left:
            raise BenchError(f"{left} unfinished execution(s) from an earlier scenario")
        orgs = create_orgs(database_url, [f"fair-{name}-{who}" for who in ("warm", "a", "b")])
        (_, warm_token), (a_org, a_token), (b_org, b_token) = orgs.values()

        env = dict(base_env)
        env.pop("RUNYARD_FAIR_WINDOW", None)
        if name == "off":
            env["RUNYARD_FAIR_WINDOW"] = "0"
        elif args.fair_window is not None:
            env["RUNYARD_FAIR_WINDOW"] = str(args.fair_window)
        window = env.get("RUNYARD_FAIR_WINDOW", "unset (the default)")
        log(f"  RUNYARD_FAIR_WINDOW {window} in the API, worker and beat")

        procs = {p: f"fair-{name}-{p}" for p in ("api", "worker", "beat")}
        port = free_port()
        children.start(procs["api"], [BIN / "runyard", "api", "--port", str(port)], env)
        wait_http(children, procs["api"], f"http://127.0.0.1:{port}/healthz", timeout=30)
        definition = {
            "name": AGENT,
            "runtime": {"type": "python", "entrypoint": ENTRYPOINT},
            "config": {"sleep_ms": args.sleep_ms},
        }
        for token in (warm_token, a_token, b_token):
            Api(port, token).call("POST", "/api/v1/agents", definition, expect=201)
        children.start(
            procs["worker"], worker_argv("workers", args.concurrency, f"bench-fair-{name}"), env
        )
        if args.beat:
            schedule = HOME / f"bench-fair-{name}-celerybeat-schedule"
            children.start(
                procs["beat"],
                [BIN / "celery", "-A", "workers", "beat", "-l", "WARNING", "-s", schedule],
                env,
            )

        def alive() -> None:
            for proc in procs.values():
                if proc in children.procs:
                    children.check(proc)

        counts_sql = """
            SELECT count(*) FILTER (WHERE status = ANY(%(terminal)s)),
                   count(*) FILTER (WHERE status = ANY(%(terminal)s) AND status <> 'succeeded'),
                   count(*) FILTER (WHERE status = 'queued')
            FROM executions WHERE org_id = %(org)s
        """

        def counts(org: str) -> tuple[int, int, int]:
            return poll.execute(counts_sql, {"terminal": list(TERMINAL), "org": org}).fetchone()

        def finished(org: str, n: int, who: str) -> Callable[[], bool]:
            def check() -> bool:
                ended, bad, _queued = counts(org)
                if bad:
                    raise BenchError(f"{bad} of {who}'s executions did not succeed")
                return ended >= n

            return check

        single = f"/api/v1/agents/{AGENT}/executions"
        if args.warmup:
            warm = Batch(args.warmup, args.a_threads, lambda: HttpSubmit(port, single, warm_token))
            warm.start()
            warm.finish(deadline)
            warm_org = orgs[f"fair-{name}-warm"][0]
            wait_for("warm-up", finished(warm_org, args.warmup, "warm-up"), deadline, alive)
            log(f"  warm-up: {args.warmup} executions in {time.time() - warm.t0:.1f} s")
        if args.beat:
            swept = lambda: bool(broker.exists(MARKER_KEY))  # noqa: E731
            wait_for("the sweeper's first sweep", swept, deadline, alive)

        # A: the backlog.
        if args.a_batch_size:
            path = single + "/batch"
            body = {"items": [{"input": {}}] * args.a_batch_size}
            requests = args.a_count // args.a_batch_size
            result.how_a = (
                f"batch endpoint, {args.a_batch_size} items a request, {args.a_threads} threads"
            )
        else:
            path, body, requests = single, None, args.a_count
            result.how_a = f"single submits from {args.a_threads} threads"
        batch = Batch(requests, args.a_threads, lambda: HttpSubmit(port, path, a_token, body))
        batch.start()
        batch.finish(deadline)
        result.a_submit_seconds = batch.t_submitted - batch.t0
        result.a_backlog = counts(a_org)[2]

        # B: the trickle.
        b_api = Api(port, b_token)
        made, result.b_latencies, result.b_span = paced(
            args.b_count, args.b_rate, lambda: b_api.call("POST", single, {"input": {}}, 202)
        )
        ids = [item["id"] for item in made]
        wait_for("B's executions", finished(b_org, args.b_count, "B"), deadline, alive)
        for execution_id in ids:
            item = b_api.call("GET", f"/api/v1/executions/{execution_id}")
            if item["status"] != "succeeded":
                raise BenchError(f"B's execution {execution_id} ended {item['status']}")
            result.b_waits.append(parse_time(item["started_at"]) - parse_time(item["queued_at"]))
        log(
            f"  A: {args.a_count} submitted in {result.a_submit_seconds:.2f} s "
            f"({result.how_a}); {result.a_backlog} not started when B began"
        )
        log(f"  B: {summary(result.b_waits)}")

        # Drain A before the next scenario: its queue starts empty.
        a_left = args.a_count - counts(a_org)[0]
        if a_left:
            log(f"  waiting for A's {a_left} unfinished executions to drain")
        wait_for("A's backlog", finished(a_org, args.a_count, "A"), deadline, alive)
        last = poll.execute(
            "SELECT extract(epoch FROM max(finished_at))::float8 FROM executions WHERE org_id = %s",
            (a_org,),
        ).fetchone()[0]
        result.a_drain_seconds = last - batch.t0
        log(
            f"  A: all {args.a_count} finished {result.a_drain_seconds:.1f} s after A's first "
            f"submit ({args.a_count / result.a_drain_seconds:.1f}/s)"
        )
        return result
    finally:
        poll.close()
        broker.close()
        for proc in ("beat", "worker", "api"):
            children.stop(f"fair-{name}-{proc}")


# ---------------------------------------------------------------------------------------------
# Plain Celery: one queue, first in, first out


def scenario_plain(args, children: Children, base_env: dict[str, str], redis_url: str) -> Result:
    import redis
    from celery.backends.redis import RedisBackend

    # As in bench/throughput.py: poll the stored results instead of subscribing to each task's
    # result channel; the worker still stores and publishes every result.
    RedisBackend.on_task_call = lambda self, producer, task_id: None
    from bench.plain_fairness import app as plain_app
    from bench.plain_fairness import stamped_sleep

    plain_app.conf.broker_url = redis_url
    plain_app.conf.result_backend = redis_url

    result = Result("plain")
    deadline = time.monotonic() + args.timeout
    flushdb(redis_url)
    client = redis.Redis.from_url(redis_url)
    proc = "fair-plain-worker"
    children.start(
        proc,
        worker_argv("bench.plain_fairness", args.concurrency, "bench-fair-plain"),
        {**base_env, "REDIS_URL": redis_url},
    )

    def alive() -> None:
        children.check(proc)

    def submit() -> str:
        return stamped_sleep.apply_async(args=[args.sleep_ms, time.time()], queue="default").id

    def keys(ids: list) -> list[str]:
        return [f"celery-task-meta-{task_id}" for task_id in ids]

    def stored(ids: list) -> Callable[[], bool]:
        names = keys(ids)

        def check() -> bool:
            found = sum(client.exists(*names[i : i + 1000]) for i in range(0, len(names), 1000))
            return found >= len(names)

        return check

    def results(ids: list) -> list[dict]:
        names, metas = keys(ids), []
        for i in range(0, len(names), 1000):
            for raw in client.mget(names[i : i + 1000]):
                meta = json.loads(raw)
                if meta["status"] != "SUCCESS":
                    raise BenchError(f"a task ended {meta['status']}: {meta.get('result')!r}")
                metas.append(meta)
        return metas

    try:
        if args.warmup:
            warm = Batch(args.warmup, args.a_threads, lambda: submit)
            warm.start()
            warm.finish(deadline)
            wait_for("warm-up", stored(warm.results), deadline, alive)
            log(f"  warm-up: {args.warmup} tasks in {time.time() - warm.t0:.1f} s")
        result.how_a = f"apply_async from {args.a_threads} threads"
        batch = Batch(args.a_count, args.a_threads, lambda: submit)
        batch.start()
        batch.finish(deadline)
        result.a_submit_seconds = batch.t_submitted - batch.t0
        result.a_backlog = client.llen("default")  # messages no worker has taken yet
        b_ids, result.b_latencies, result.b_span = paced(args.b_count, args.b_rate, submit)
        wait_for("B's tasks", stored(b_ids), deadline, alive)
        result.b_waits = [m["result"]["started"] - m["result"]["submitted"] for m in results(b_ids)]
        log(
            f"  A: {args.a_count} submitted in {result.a_submit_seconds:.2f} s "
            f"({result.how_a}); {result.a_backlog} messages in the queue when B began"
        )
        log(f"  B: {summary(result.b_waits)}")
        log("  waiting for A's backlog to drain")
        wait_for("A's backlog", stored(batch.results), deadline, alive)
        last = max(parse_time(m["date_done"]) for m in results(batch.results))
        result.a_drain_seconds = last - batch.t0
        log(
            f"  A: all {args.a_count} finished {result.a_drain_seconds:.1f} s after A's first "
            f"submit ({args.a_count / result.a_drain_seconds:.1f}/s)"
        )
        return result
    finally:
        client.close()
        with contextlib.suppress(Exception):
            plain_app.pool.force_close_all()
        children.stop(proc)


# ---------------------------------------------------------------------------------------------
# Report


def summary(waits: list[float]) -> str:
    return (
        f"queue wait median {statistics.median(waits):.3f} s, p90 {percentile(waits, 90):.3f}, "
        f"p99 {percentile(waits, 99):.3f}, max {max(waits):.3f} ({len(waits)} executions)"
    )


def table(args, results: dict[str, Result | None]) -> list[str]:
    names = [n for n in args.scenarios if n in results]
    width = max(16, *(len(LABELS[n]) for n in names)) + 2

    def row(label: str, cell: Callable[[Result], str]) -> str:
        cells = [(cell(r) if (r := results[n]) else "failed").rjust(width) for n in names]
        return f"{label:<34}" + "".join(cells)

    def ms(values: list[float], p: float) -> str:
        return f"{percentile(values, p) * 1000:.0f} ms"

    return [
        f"B's queue wait ({args.b_count} at {args.b_rate:g}/s): started_at - queued_at "
        "(plain celery: the task's start - apply_async):",
        f"{'':<34}" + "".join(LABELS[n].rjust(width) for n in names),
        row("  median", lambda r: f"{statistics.median(r.b_waits):.3f} s"),
        row("  p90", lambda r: f"{percentile(r.b_waits, 90):.3f} s"),
        row("  p99", lambda r: f"{percentile(r.b_waits, 99):.3f} s"),
        row("  max", lambda r: f"{max(r.b_waits):.3f} s"),
        row("B's submit round trip, median", lambda r: ms(r.b_latencies, 50)),
        row("B's submit round trip, max", lambda r: ms(r.b_latencies, 100)),
        row("B's submits took", lambda r: f"{r.b_span:.1f} s"),
        row(f"A: {args.a_count} submitted in", lambda r: f"{r.a_submit_seconds:.2f} s"),
        row("A: not started when B began", lambda r: str(r.a_backlog)),
        row("A: all finished after", lambda r: f"{r.a_drain_seconds:.1f} s"),
        row(
            "A: rate, first submit -> last end",
            lambda r: f"{args.a_count / r.a_drain_seconds:.1f}/s",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a-count", type=int, default=3000, help="A's executions (the backlog)")
    parser.add_argument("--b-count", type=int, default=50, help="B's executions")
    parser.add_argument("--b-rate", type=float, default=5.0, help="B's submits per second")
    parser.add_argument(
        "--a-batch-size",
        type=int,
        default=0,
        help="A submits through the batch endpoint, this many items a request (0: one by one)",
    )
    parser.add_argument("--a-threads", type=int, default=4, help="A's client threads")
    parser.add_argument("--sleep-ms", type=int, default=10, help="each execution sleeps this long")
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    parser.add_argument("--warmup", type=int, default=50, help="uncounted executions first")
    parser.add_argument(
        "--scenarios",
        default="on,off,plain",
        help="comma-separated, run in this order: on, off, plain",
    )
    parser.add_argument(
        "--fair-window", type=int, help="RUNYARD_FAIR_WINDOW for `on` (default: left unset)"
    )
    parser.add_argument(
        "--no-beat", dest="beat", action="store_false", help="run no beat (and so no sweeper)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per scenario")
    parser.add_argument("--redis-db", type=int, default=12, help="Redis database when REDIS_URL")
    parser.add_argument("--keep-db", action="store_true", help=f"leave the {DATABASE} database")
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenarios or set(args.scenarios) - set(LABELS):
        parser.error("--scenarios takes on, off and plain, comma-separated")
    if args.a_count < 1 or args.b_count < 1 or args.b_rate <= 0 or args.a_threads < 1:
        parser.error("--a-count, --b-count, --b-rate and --a-threads must be positive")
    if args.a_batch_size and (args.a_batch_size > 1000 or args.a_count % args.a_batch_size):
        parser.error("--a-batch-size must be 1..1000 and divide --a-count")
    if args.fair_window is not None and args.fair_window < 1:
        parser.error("--fair-window must be at least 1 (`off` is the scenario with 0)")

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)

    cleanups: list[Callable[[], None]] = []
    children = Children()
    results: dict[str, Result | None] = {}
    started = time.monotonic()
    status = 0
    try:
        how = (
            f"batches of {args.a_batch_size}" if args.a_batch_size else "single submits"
        ) + f" from {args.a_threads} threads"
        log(
            f"fairness: A {args.a_count} x {args.sleep_ms} ms ({how}), then B {args.b_count} at "
            f"{args.b_rate:g}/s; worker -P prefork -c {args.concurrency}, {os.cpu_count()} CPUs, "
            f"load average {loadavg()}; logs in {LOG_DIR}"
        )
        database_url = setup_database(cleanups, args.keep_db)
        redis_url = setup_redis(cleanups, args.redis_db)
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "RUNYARD_AGENT_MODULES": AGENT_MODULES,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        for name in ("RUNYARD_BROKER_URL", "RUNYARD_RESULT_BACKEND"):
            env.pop(name, None)
        os.environ["REDIS_URL"] = redis_url

        for name in args.scenarios:
            log(f"scenario {LABELS[name]}:")
            results[name] = None
            try:
                if name == "plain":
                    results[name] = scenario_plain(args, children, env, redis_url)
                else:
                    results[name] = scenario_runyard(
                        args, name, children, env, database_url, redis_url
                    )
            except BenchError as exc:
                log(f"  {name} FAILED: {exc}")
                status = 1

        log("")
        for line in table(args, results):
            log(line)
        log(f"load average now {loadavg()}")
        on = results.get("on")
        if on:
            p99 = percentile(on.b_waits, 99)
            verdict = "met" if p99 <= TARGET_P99 else "MISSED"
            log(
                f"target: B's p99 <= {TARGET_P99:g} s with flow control on: {verdict} ({p99:.3f} s)"
            )
            if p99 > TARGET_P99 and not status:
                status = 2
    except KeyboardInterrupt:
        log("\ninterrupted")
        status = 130
    except BenchError as exc:
        log(f"FAILED: {exc}")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children.stop_all()
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception as exc:  # keep cleaning up
                log(f"cleanup: {exc!r}")
        log(f"total {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
