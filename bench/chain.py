#!/usr/bin/env python
"""A 40-step sequential chain: Runyard against a plain Celery chain on the same machine.

    .venv/bin/python bench/chain.py [--steps 40] [--runs 5] [--sleep-ms 10] [--concurrency 2]

Runyard: `runyard api` (gunicorn) and `celery -A workers worker`; a chain of `--steps` steps of a
`python` agent that sleeps `--sleep-ms`, each step reading the previous step's output. Time =
the client's clock just before POST /api/v1/chains/.../executions -> the chain execution's
stored `finished_at`. Plain Celery: `celery -A bench.plain_chain worker` with the same pool, on
a Redis database of its own; a `chain()` of `--steps` immutable signatures of a task that sleeps
as long; time = just before apply_async -> the last task's stored `date_done`. Both sides are up
at once and their chains alternate (one warm-up each, then `--runs` each), so load from
elsewhere on the machine falls on both alike. It prints every run, the medians and the best,
the overhead per step, the CPU each process group spent per step (`other` is everything else
on the machine), and where a Runyard step's time went, from the stored timestamps.
It exits 2 when the ratio of the medians misses the target (<= 1.5), 1 when a run failed.

Servers: DATABASE_URL set -> a fresh database `runyard_bench_chain` on that server (dropped at
the end); unset -> embedded PostgreSQL. Redis is always an embedded instance of its own on a
free port, so nothing here can touch another run's queues. Every process it starts runs in its
own session and is killed with its process group at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import (  # noqa: E402 - after the sys.path fix above
    BIN,
    HOME,
    LOG_DIR,
    BenchError,
    Children,
    cpu_groups,
    cpu_snapshot,
    free_port,
    libpq_url,
    log,
    wait_http,
    worker_argv,
)

DATABASE = "runyard_bench_chain"
AGENT = "sleeper"
ENTRYPOINT = "bench.plain_chain:sleep_step"
POLL_SECONDS = 0.01
TARGET_RATIO = 1.5  # Runyard's median over plain Celery's; above it the run exits 2


def setup_database(cleanups: list[Callable[[], None]]) -> str:
    import psycopg
    from sqlalchemy.engine import make_url

    from app.config import sqlalchemy_url

    given = os.environ.get("DATABASE_URL", "")
    if given:
        server_url = make_url(sqlalchemy_url(given))
    else:
        from app.embedded import EmbeddedPostgres

        postgres = EmbeddedPostgres(HOME / "bench-pg", database=DATABASE)
        server_url = make_url(postgres.start())
        cleanups.append(postgres.stop)
    admin = libpq_url(server_url.set(database="postgres"))

    def recreate(create: bool) -> None:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            if create:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')

    recreate(create=True)
    cleanups.append(lambda: recreate(create=False))
    log(f"database: {DATABASE} on {server_url.render_as_string(hide_password=True)}")
    return server_url.set(database=DATABASE).render_as_string(hide_password=False)


def setup_redis(cleanups: list[Callable[[], None]]) -> str:
    from app.embedded import EmbeddedRedis

    server = EmbeddedRedis(HOME / "bench-chain-redis")
    url = server.start()
    cleanups.append(server.stop)
    log(f"redis: embedded, {url}")
    return url


def create_org(database_url: str) -> str:
    from app.db import db
    from app.migrate import upgrade
    from app.orgs import services

    upgrade(database_url)
    db.configure(database_url)
    try:
        with db.session() as session:
            _org, token = services.create_org(session, "bench")
            session.commit()
            return token
    finally:
        db.dispose()


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Api:
    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def post(self, path: str, body: dict) -> dict:
        # A connection per request: the API closes idle keep-alive connections within seconds.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", path, json.dumps(body).encode(), self.headers)
            response = conn.getresponse()
            data = json.loads(response.read() or b"null")
        finally:
            conn.close()
        if response.status >= 300:
            raise BenchError(f"POST {path} answered {response.status}: {data}")
        return data


class Side:
    """One side of the comparison: `one()` runs a chain and returns its seconds."""

    name = ""
    sessions: dict[str, int]

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: dict[str, float] = {}

    def measured(self) -> None:
        before = cpu_snapshot()
        self.times.append(self.one())
        for group, seconds in cpu_groups(before, cpu_snapshot(), self.sessions).items():
            self.cpu[group] = self.cpu.get(group, 0.0) + seconds

    def one(self) -> float:
        raise NotImplementedError

    def report(self, steps: int) -> str:
        per = {
            group: seconds * 1000 / (steps * len(self.times)) for group, seconds in self.cpu.items()
        }
        mine = sum(value for group, value in per.items() if group != "other")
        return (
            "  runs: " + ", ".join(f"{t:.3f}" for t in self.times) + " s\n"
            "  cpu ms/step: "
            + ", ".join(f"{g} {v:.2f}" for g, v in per.items())
            + f"; sum without other {mine:.2f}"
        )


class Runyard(Side):
    name = "runyard"

    def __init__(self, args, children: Children, env, database_url: str) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        super().__init__()
        self.args, self.children = args, children
        token = create_org(database_url)
        port = free_port()
        children.start("api", [BIN / "runyard", "api", "--port", str(port)], env)
        wait_http(children, "api", f"http://127.0.0.1:{port}/healthz", timeout=30)
        self.api = Api(port, token)
        self.api.post(
            "/api/v1/agents",
            {
                "name": AGENT,
                "runtime": {"type": "python", "entrypoint": ENTRYPOINT},
                "config": {"sleep_ms": args.sleep_ms},
            },
        )
        steps = [{"name": f"s{i}", "agent": AGENT} for i in range(args.steps)]
        self.api.post("/api/v1/chains", {"name": "bench", "steps": steps})
        children.start(
            "runyard-worker", worker_argv("workers", args.concurrency, "bench-chain"), env
        )
        self.sessions = {
            "api": children.procs["api"].pid,
            "worker": children.procs["runyard-worker"].pid,
        }
        self.poll = psycopg.connect(libpq_url(make_url(database_url)), autocommit=True)

    def one(self) -> float:
        t0 = time.time()
        chain_execution = self.api.post("/api/v1/chains/bench/executions", {"input": {"n": 0}})
        deadline = time.monotonic() + self.args.timeout
        while True:
            status, finished = self.poll.execute(
                "SELECT status, extract(epoch FROM finished_at)::float8 "
                "FROM chain_executions WHERE id = %s",
                (chain_execution["id"],),
            ).fetchone()
            if status == "succeeded":
                return finished - t0
            if status in ("failed", "cancelled"):
                raise BenchError(f"the chain execution {chain_execution['id']} ended {status}")
            self.children.check("runyard-worker")
            if time.monotonic() > deadline:
                raise BenchError(f"the chain did not finish within {self.args.timeout} s")
            time.sleep(POLL_SECONDS)

    def check(self, chains: int) -> str:
        """Every step ran once; where a step's time went, from the stored timestamps."""
        rows = self.poll.execute(
            "SELECT count(*), count(DISTINCT id), max(attempt) FROM executions"
        ).fetchone()
        expected = self.args.steps * chains
        if rows[0] != expected or rows[2] != 1:
            raise BenchError(f"expected {expected} step executions run once each, found {rows}")
        breakdown = self.poll.execute(BREAKDOWN_SQL).fetchone()
        return "  ms/step from the stored timestamps: " + ", ".join(
            f"{name} {value:.1f}" for name, value in zip(BREAKDOWN_NAMES, breakdown, strict=True)
        )

    def close(self) -> None:
        self.poll.close()


# Where a step's time goes, from the rows: the previous step's end -> this step's row created
# (the Celery hop and reading the chain's state), -> claimed, -> finished (the agent and its
# recording).
BREAKDOWN_NAMES = ("previous finished -> row created", "-> claimed", "-> finished")
BREAKDOWN_SQL = """
    SELECT avg(extract(epoch FROM e.queued_at - p.finished_at)) * 1000,
           avg(extract(epoch FROM e.started_at - e.queued_at)) * 1000,
           avg(extract(epoch FROM e.finished_at - e.started_at)) * 1000
    FROM executions e
    JOIN executions p ON p.chain_execution_id = e.chain_execution_id
                     AND p.chain_stage = e.chain_stage - 1
"""


class Plain(Side):
    name = "plain celery"

    def __init__(self, args, children: Children, env, redis_url: str) -> None:
        import redis

        from bench.plain_chain import app as plain_app

        super().__init__()
        self.args, self.children = args, children
        self.app = plain_app
        plain_app.conf.broker_url = redis_url
        plain_app.conf.result_backend = redis_url
        children.start(
            "plain-worker",
            worker_argv("bench.plain_chain", args.concurrency, "bench-plain"),
            {**env, "REDIS_URL": redis_url},
        )
        self.sessions = {"worker": children.procs["plain-worker"].pid}
        self.client = redis.Redis.from_url(redis_url)

    def one(self) -> float:
        from celery import chain

        from bench.plain_chain import sleep_task

        signatures = [sleep_task.si(self.args.sleep_ms) for _ in range(self.args.steps)]
        t0 = time.time()
        result = chain(*signatures).apply_async()
        key = f"celery-task-meta-{result.id}"  # the last task's id
        deadline = time.monotonic() + self.args.timeout
        while True:
            raw = self.client.get(key)
            if raw:
                meta = json.loads(raw)
                if meta["status"] != "SUCCESS":
                    raise BenchError(f"the plain chain ended {meta['status']}")
                done = dt.datetime.fromisoformat(meta["date_done"])
                if done.tzinfo is None:
                    done = done.replace(tzinfo=dt.UTC)
                return done.timestamp() - t0
            self.children.check("plain-worker")
            if time.monotonic() > deadline:
                raise BenchError(f"the plain chain did not finish within {self.args.timeout} s")
            time.sleep(POLL_SECONDS)

    def close(self) -> None:
        self.client.close()
        with contextlib.suppress(Exception):
            self.app.pool.force_close_all()


def bench_env(database_url: str, redis_url: str) -> dict[str, str]:
    """The environment of every process a bench starts (and this one's REDIS_URL and agent
    modules): its own servers, the bench's agent modules, no broker set elsewhere."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "RUNYARD_AGENT_MODULES": "runyard_examples,bench.plain_chain",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    for name in ("RUNYARD_BROKER_URL", "RUNYARD_RESULT_BACKEND"):
        env.pop(name, None)
    os.environ.update(
        {"REDIS_URL": redis_url, "RUNYARD_AGENT_MODULES": env["RUNYARD_AGENT_MODULES"]}
    )
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--runs", type=int, default=5, help="measured chains per side")
    parser.add_argument("--sleep-ms", type=int, default=10, help="each step sleeps this long")
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per chain")
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
            f"chain: {args.steps} sequential steps sleeping {args.sleep_ms} ms, {args.runs} runs "
            f"per side after one warm-up, worker -P prefork -c {args.concurrency}, "
            f"{os.cpu_count()} CPUs, load average {loadavg()}; logs in {LOG_DIR}"
        )
        database_url = setup_database(cleanups)
        redis_url = setup_redis(cleanups)
        env = bench_env(database_url, redis_url)
        # Both sides are up at once, on Redis databases of their own, and their chains alternate:
        # a change in the machine's load (2 shared cores) falls on both alike.
        runyard = Runyard(args, children, env, database_url)
        plain = Plain(args, children, env, redis_url.rsplit("/", 1)[0] + "/1")
        sides = (runyard, plain)
        try:
            time.sleep(3)  # both workers' pools are up
            for side in sides:
                side.one()  # warm-up: caches, connections, imports
            for _ in range(args.runs):
                for side in sides:
                    side.measured()
            breakdown = runyard.check(args.runs + 1)
        finally:
            for side in sides:
                side.close()
        for side in sides:
            log(f"{side.name}:")
            log(side.report(args.steps))
            if side is runyard:
                log(breakdown)
        log("")
        ours, theirs = statistics.median(runyard.times), statistics.median(plain.times)
        log(f"runyard      median {ours:.3f} s, best {min(runyard.times):.3f} s")
        log(f"plain celery median {theirs:.3f} s, best {min(plain.times):.3f} s")
        log(
            f"ratio {ours / theirs:.2f} (target <= {TARGET_RATIO}); overhead per step "
            f"{(ours - theirs) * 1000 / args.steps:.1f} ms; load average now {loadavg()}"
        )
        if ours / theirs > TARGET_RATIO:
            log(f"MISSED: the ratio is above the target {TARGET_RATIO}")
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
            except Exception as exc:
                log(f"cleanup: {exc!r}")
    return status


if __name__ == "__main__":
    sys.exit(main())
