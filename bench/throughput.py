#!/usr/bin/env python
"""End-to-end throughput: Runyard executions per second against plain Celery on the same machine.

    .venv/bin/python bench/throughput.py [--count 3000] [--threads 8] [--concurrency 2]
                                         [--batch-size 100] [--rounds 5]
    # the batch endpoint, 100 items a request from 4 client threads:
    .venv/bin/python bench/throughput.py --batch-size 100 --client-threads 4

Phase 1, Runyard: `runyard api` (gunicorn) and `celery -A workers worker`; client threads
(--threads, or its other name --client-threads) POST /api/v1/agents/noop/executions over
keep-alive HTTP connections (with --batch-size N, N items a request to .../executions/batch);
done when every execution is `succeeded` in PostgreSQL. Phase 2, plain Celery: `celery -A
bench.plain_celery worker` with the same pool, concurrency and broker; as many client threads
call apply_async on a no-op task, one task a call whatever --batch-size says (that is how plain
Celery submits); done when every result is in the Redis result backend. The phases run one
after the other, each after a warm-up that is not counted. Rate = N / (first submit -> last
result stored, taken from the stored timestamps: executions.finished_at and the result's
date_done). It prints both rates and their ratio. With --rounds N the two phases run N times,
alternating, and it prints every round's ratio and reports the round with the median ratio: on
a shared virtual machine one run's plain Celery rate can be twice the next one's.

It also prints the CPU each process group spent per execution during the measured window
(from /proc: the API's and worker's process sessions, every `postgres` and `redis-server`
process, and this client), then each of the API's and worker's processes alone (the gunicorn
master and workers, the Celery main process and pool processes) with its share of one core,
and the busiest PostgreSQL backend. With both phases run, it closes with what a ratio of 0.9
would ask: the machine CPU per execution that plain Celery's rate x 0.9 leaves on these cores
beside what Runyard used, and Runyard's CPU per execution minus plain Celery's, per group. A
process near 100% of a core is a serial bottleneck; a machine well below 100% busy means the
time goes to waits (round trips, prefetch 1), not CPU.

Servers: DATABASE_URL set -> a fresh database `runyard_bench` on that server (dropped at the end
unless --keep-db); unset -> embedded PostgreSQL under .runyard/bench-pg. REDIS_URL set -> its
server with database --redis-db or the next one no test run or benchmark holds (FLUSHDB before
each phase); unset -> embedded Redis. --broker-url amqp://... -> both phases publish to that
RabbitMQ instead (a vhost of the benchmark's own), results still in Redis. Every
process it starts runs in its own session and is killed with its process group at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
# `python bench/throughput.py` puts bench/ first on sys.path, not the repository root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
HOME = ROOT / ".runyard"
LOG_DIR = HOME / "bench-logs"
DATABASE = "runyard_bench"
AGENT = "noop"
ENTRYPOINT = "runyard_examples.text:noop"
POLL_SECONDS = 0.2
TICK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    pass


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Child processes


class Children:
    """Processes started in their own session; stop() kills the whole process group."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        LOG_DIR.mkdir(parents=True, exist_ok=True)

    def log_path(self, name: str) -> Path:
        return LOG_DIR / f"{name}.log"

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.log_path(name), "wb") as out:
            proc = subprocess.Popen(
                [str(a) for a in argv],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def check(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise BenchError(
                f"{name} exited with code {proc.returncode}; last lines of "
                f"{self.log_path(name)}:\n{self.tail(name)}"
            )

    def stop(self, name: str, timeout: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
        # The leader may be gone while pool processes linger: always sweep the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


# ---------------------------------------------------------------------------------------------
# CPU accounting from /proc


def _proc_stats() -> list[tuple[int, str, int, float]]:
    """(pid, comm, session, cpu seconds) of every live process."""
    rows = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[0] is state (field 3 of stat): session is field 6, utime 14, stime 15.
        rows.append((int(entry), comm, int(fields[3]), (int(fields[11]) + int(fields[12])) / TICK))
    return rows


def _machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    values = [int(v) for v in parts]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICK


def cpu_snapshot() -> dict:
    """Every process's CPU seconds so far, and the machine's busy seconds."""
    return {
        "procs": {pid: (comm, session, cpu) for pid, comm, session, cpu in _proc_stats()},
        "machine": _machine_busy_seconds(),
    }


def cpu_groups(before: dict, after: dict, sessions: dict[str, int]) -> dict[str, float]:
    """CPU seconds spent between two snapshots, per group. Compared per process, so a process
    that exits in between drops out instead of subtracting its past. A group named `worker` is
    split into the Celery main process (consumer, acks, events) and its pool processes."""
    totals: dict[str, float] = {}
    for name in sessions:
        if name == "worker":
            totals.update({"worker-main": 0.0, "worker-pool": 0.0})
        else:
            totals[name] = 0.0
    totals.update(postgres=0.0, redis=0.0, client=0.0, other=0.0)
    me = os.getpid()
    for pid, (comm, session, cpu) in after["procs"].items():
        old = before["procs"].get(pid)
        spent = cpu - (old[2] if old and old[0] == comm else 0.0)
        for name, sid in sessions.items():
            if session == sid:
                if name == "worker":
                    name = "worker-main" if pid == sid else "worker-pool"
                totals[name] += spent
                break
        else:
            if comm == "postgres" or comm.startswith("postgres:"):
                totals["postgres"] += spent
            elif comm.startswith("redis-server"):
                totals["redis"] += spent
            elif pid == me:
                totals["client"] += spent
            else:
                totals["other"] += spent
    return totals


def cpu_per_process(before: dict, after: dict, sessions: dict[str, int]) -> list[tuple[str, float]]:
    """CPU seconds spent between two snapshots by each process of the named sessions (the
    session's leader is the gunicorn master or the Celery main process, the rest are gunicorn
    workers or pool processes), then by the busiest `postgres` process (a backend)."""
    rows: list[tuple[str, float]] = []
    postgres: list[float] = []
    for pid, (comm, session, cpu) in sorted(after["procs"].items()):
        old = before["procs"].get(pid)
        spent = cpu - (old[2] if old and old[0] == comm else 0.0)
        for name, sid in sessions.items():
            if session == sid:
                leader, other = ("main", "pool") if name == "worker" else ("master", "worker")
                rows.append((f"{name} {leader if pid == sid else other}", spent))
                break
        else:
            if comm == "postgres" or comm.startswith("postgres:"):
                postgres.append(spent)
    rows.sort(key=lambda row: (row[0].split()[0], not row[0].endswith(("main", "master"))))
    if postgres:
        rows.append(("busiest postgres", max(postgres)))
    return rows


class CpuUsage:
    """The CPU a phase spent on `n` items over `wall` seconds: per group, per process and the
    whole machine."""

    def __init__(self, before: dict, after: dict, sessions: dict[str, int], n: int, wall: float):
        self.n, self.wall = n, wall
        self.groups = {k: v * 1000 / n for k, v in cpu_groups(before, after, sessions).items()}
        self.processes = cpu_per_process(before, after, sessions)
        self.machine_ms = (after["machine"] - before["machine"]) * 1000 / n
        cores = os.cpu_count() or 1
        self.busy = (after["machine"] - before["machine"]) / (wall * cores) * 100

    def core_percent(self, seconds: float) -> float:
        return seconds / self.wall * 100

    def busiest(self) -> tuple[str, float]:
        """The process that spent the most CPU, as a % of one core."""
        label, seconds = max(self.processes, key=lambda row: row[1], default=("none", 0.0))
        return label, self.core_percent(seconds)

    def report(self) -> str:
        shown = self.groups.items()
        parts = [f"{k} {v:.2f}" for k, v in shown if v >= 0.005 or k in ("postgres", "redis")]
        procs = [
            f"{label} {seconds * 1000 / self.n:.2f} ({self.core_percent(seconds):.0f}%)"
            for label, seconds in self.processes
        ]
        return (
            f"  cpu ms/item: {', '.join(parts)}; sum {sum(self.groups.values()):.2f} "
            f"(whole machine {self.machine_ms:.2f}, {self.busy:.0f}% of {os.cpu_count()} cores "
            "busy)\n"
            f"  per process, cpu ms/item (% of one core): {', '.join(procs)}"
        )


def cpu_report(before: dict, after: dict, sessions: dict[str, int], n: int, wall: float) -> str:
    return CpuUsage(before, after, sessions, n, wall).report()


# ---------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    from app.embedded import free_port as _free_port

    return _free_port()


def libpq_url(url) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def setup_database(cleanups: list[Callable[[], None]], keep: bool, database: str = DATABASE) -> str:
    """A fresh database (`runyard_bench` unless named); returns its SQLAlchemy URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    from app.config import sqlalchemy_url

    given = os.environ.get("DATABASE_URL", "")
    if given:
        server_url = make_url(sqlalchemy_url(given))
        log(f"database: {database} on {server_url.render_as_string(hide_password=True)}")
    else:
        from app.embedded import EmbeddedPostgres

        log(f"database: embedded PostgreSQL under {HOME / 'bench-pg'}")
        postgres = EmbeddedPostgres(HOME / "bench-pg", database=database)
        server_url = make_url(postgres.start())
        cleanups.append(postgres.stop)
    admin = libpq_url(server_url.set(database="postgres"))

    def recreate(create: bool) -> None:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP database IF EXISTS "{database}" WITH (FORCE)')
            if create:
                conn.execute(f'CREATE database "{database}"')

    recreate(create=True)
    if not keep:
        cleanups.append(lambda: recreate(create=False))
    return server_url.set(database=database).render_as_string(hide_password=False)


# The key test runs (tests/conftest.py) and benchmarks set, with NX, on the database they use:
# nobody flushes a database another run is using.
REDIS_CLAIM_KEY = "runyard:test-run"


def setup_redis(cleanups: list[Callable[[], None]], db_number: int) -> str:
    import redis

    given = os.environ.get("REDIS_URL", "")
    if not given:
        from app.embedded import EmbeddedRedis

        log(f"redis: embedded under {HOME / 'bench-redis'}")
        server = EmbeddedRedis(HOME / "bench-redis")
        given = server.start()
        cleanups.append(server.stop)
    for offset in range(15):
        number = 1 + (db_number - 1 + offset) % 15
        url = urlunsplit(urlsplit(given)._replace(path=f"/{number}"))
        client = redis.Redis.from_url(url)
        if client.set(REDIS_CLAIM_KEY, f"bench-{os.getpid()}", nx=True, ex=3600):
            cleanups.append(lambda url=url: flushdb(url, claim=False))
            log(f"redis: database {number} on {urlsplit(given).netloc.rpartition('@')[2]}")
            return url
    raise BenchError("every Redis database 1..15 is in use by a test run or benchmark")


def flushdb(redis_url: str, claim: bool = True) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    if claim:
        client.set(REDIS_CLAIM_KEY, f"bench-{os.getpid()}", ex=3600)
    client.close()


BENCH_VHOST = "runyard_bench"


def rabbitmq_vhost(broker_url: str) -> str:
    """A fresh vhost BENCH_VHOST on the RabbitMQ of `broker_url` (made again: queues and
    messages of a former phase go), the URL pointing at it. `rabbitmqctl` as root, on the
    machine that runs the broker."""
    parts = urlsplit(broker_url)
    subprocess.run(["rabbitmqctl", "delete_vhost", BENCH_VHOST], capture_output=True, check=False)
    for argv in (
        ["add_vhost", BENCH_VHOST],
        ["set_permissions", "-p", BENCH_VHOST, parts.username or "guest", ".*", ".*", ".*"],
    ):
        done = subprocess.run(["rabbitmqctl", *argv], capture_output=True, text=True, check=False)
        if done.returncode:
            raise BenchError(f"rabbitmqctl {' '.join(argv)}: {done.stderr.strip()}")
    return urlunsplit(parts._replace(path=f"/{BENCH_VHOST}"))


def create_org(database_url: str) -> tuple[str, str]:
    from app.db import db
    from app.migrate import upgrade
    from app.orgs import services

    upgrade(database_url)
    db.configure(database_url)
    try:
        with db.session() as session:
            # One organization a round (--rounds): each round starts with an empty queue.
            org, token = services.create_org(session, f"bench-{os.urandom(4).hex()}")
            session.commit()
            return str(org.id), token
    finally:
        db.dispose()


def wait_http(children: Children, name: str, url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        children.check(name)
        if time.monotonic() > deadline:
            raise BenchError(f"{url} did not answer within {timeout:.0f}s:\n{children.tail(name)}")
        time.sleep(0.1)


def worker_argv(app_module: str, concurrency: int, node: str) -> list[str]:
    return [
        BIN / "celery",
        "-A",
        app_module,
        "worker",
        "-P",
        "prefork",
        "-c",
        str(concurrency),
        "-Q",
        "default",
        "--without-gossip",
        "--without-mingle",
        "-l",
        "WARNING",
        "-n",
        f"{node}@%h",
    ]


# ---------------------------------------------------------------------------------------------
# Load generation


class Batch:
    """`n` submits spread over `threads` threads, released together."""

    def __init__(self, n: int, threads: int, make_submit: Callable[[], Callable[[], object]]):
        self.n = n
        self.threads = threads
        self.make_submit = make_submit
        self.results: list[object] = []
        self.errors: list[str] = []
        self._lists: list[list[object]] = []
        self.t0 = 0.0
        self.t_submitted = 0.0
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(threads + 1)
        self._threads: list[threading.Thread] = []

    def _run(self, share: int) -> None:
        mine: list[object] = []
        with self._lock:
            self._lists.append(mine)
        try:
            submit = self.make_submit()
        except Exception as exc:
            with self._lock:
                self.errors.append(f"setup: {exc!r}")
            self._barrier.abort()
            return
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            return
        failed = None
        for _ in range(share):
            try:
                mine.append(submit())
            except Exception as exc:  # recorded and reported; the phase then fails
                failed = f"{type(exc).__name__}: {exc}"
                break
        closer = getattr(submit, "close", None)
        if closer:
            closer()
        with self._lock:
            self.results.extend(mine)
            if failed:
                self.errors.append(failed)

    def start(self) -> None:
        for i in range(self.threads):
            share = self.n // self.threads + (1 if i < self.n % self.threads else 0)
            thread = threading.Thread(target=self._run, args=(share,), daemon=True)
            thread.start()
            self._threads.append(thread)
        try:
            self._barrier.wait(timeout=30)
        except threading.BrokenBarrierError:
            raise BenchError(f"client threads did not start: {self.errors}") from None
        self.t0 = time.time()

    @property
    def submitted(self) -> int:
        """Submits that succeeded so far (each thread appends to its own list)."""
        return sum(len(mine) for mine in self._lists)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def finish(self, deadline: float) -> None:
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.running:
            raise BenchError(f"submitting did not finish in time ({self.submitted}/{self.n} done)")
        self.t_submitted = time.time()
        if self.errors:
            raise BenchError(f"{len(self.errors)} client thread(s) failed: {self.errors[0]}")


class HttpSubmit:
    """One keep-alive connection per thread."""

    def __init__(self, port: int, path: str, token: str, body: dict | None = None) -> None:
        self.port = port
        self.path = path
        self.headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        self.body = json.dumps(body or {"input": {}}).encode()
        self.conn: http.client.HTTPConnection | None = None

    def __call__(self) -> None:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.conn.request("POST", self.path, self.body, self.headers)
                response = self.conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed an idle keep-alive connection: reconnect once. (If the request
                # had been handled this makes a duplicate; the completion check uses >=.)
                self.close()
                if attempt:
                    raise
                continue
            if response.status != 202:
                raise BenchError(f"HTTP {response.status}: {data[:300]!r}")
            if response.will_close:
                self.close()
            return
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def wait_until(
    done: Callable[[], bool], deadline: float, what: str, alive: Callable[[], None]
) -> None:
    while not done():
        alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not finished within the phase timeout")
        time.sleep(POLL_SECONDS)


def rate_line(label: str, unit: str, n: int, seconds: float) -> str:
    return f"{label}: {n} {unit} in {seconds:.2f} s = {n / seconds:.1f}/s"


# ---------------------------------------------------------------------------------------------
# Phase 1: Runyard


def phase_runyard(
    args, children: Children, env: dict[str, str], database_url: str
) -> tuple[float, CpuUsage]:
    import psycopg
    from sqlalchemy.engine import make_url

    deadline = time.monotonic() + args.timeout
    org_id, token = create_org(database_url)
    port = free_port()
    children.start("api", [BIN / "runyard", "api", "--port", str(port)], env)
    wait_http(children, "api", f"http://127.0.0.1:{port}/healthz", timeout=30)

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    definition = {"name": AGENT, "runtime": {"type": "python", "entrypoint": ENTRYPOINT}}
    conn.request(
        "POST",
        "/api/v1/agents",
        json.dumps(definition).encode(),
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    body = response.read()
    conn.close()
    if response.status != 201:
        raise BenchError(f"creating the agent answered {response.status}: {body[:300]!r}")

    children.start("runyard-worker", worker_argv("workers", args.concurrency, "bench-runyard"), env)
    sessions = {"api": children.procs["api"].pid, "worker": children.procs["runyard-worker"].pid}

    def alive() -> None:
        children.check("api")
        children.check("runyard-worker")

    poll = psycopg.connect(libpq_url(make_url(database_url)), autocommit=True)
    status_sql = """
        SELECT count(*) FILTER (WHERE status = 'succeeded'),
               count(*) FILTER (WHERE status IN ('failed', 'timed_out', 'cancelled')),
               extract(epoch FROM max(finished_at))::float8
        FROM executions WHERE org_id = %s
    """
    state = {"ok": 0, "bad": 0, "last": None}

    def reached(target: int) -> Callable[[], bool]:
        def check() -> bool:
            state["ok"], state["bad"], state["last"] = poll.execute(
                status_sql, (org_id,)
            ).fetchone()
            if state["bad"]:
                raise BenchError(f"{state['bad']} execution(s) did not succeed; see the executions")
            return state["ok"] >= target

        return check

    # One execution per request, or --batch-size of them through the batch endpoint.
    per_request = args.batch_size or 1
    path = f"/api/v1/agents/{AGENT}/executions" + ("/batch" if args.batch_size else "")
    body = {"items": [{"input": {}}] * args.batch_size} if args.batch_size else None

    def submitter() -> HttpSubmit:
        return HttpSubmit(port, path, token, body)

    try:
        if args.warmup:
            warm = Batch(max(1, args.warmup // per_request), args.threads, submitter)
            warm.start()
            warm.finish(deadline)
            wait_until(reached(warm.submitted * per_request), deadline, "runyard warm-up", alive)
            log(f"  warm-up: {args.warmup} executions in {time.time() - warm.t0:.1f} s")
        base = state["ok"]
        batch = Batch(args.count // per_request, args.threads, submitter)
        before = cpu_snapshot()
        batch.start()
        try:
            while batch.running:
                alive()
                if time.monotonic() > deadline:
                    break
                reached(0)()
                time.sleep(POLL_SECONDS)
            batch.finish(deadline)
            wait_until(reached(base + batch.submitted * per_request), deadline, "runyard", alive)
        except BenchError:
            done = state["ok"] - base
            elapsed = time.time() - batch.t0
            log(
                f"  FAILED after {elapsed:.1f} s: {done}/{args.count} succeeded "
                f"({done / elapsed:.1f}/s so far), {batch.submitted} submitted"
            )
            raise
        seen = time.time()
        after = cpu_snapshot()
    finally:
        poll.close()
    last = state["last"]
    # The stored finished_at is exact; poll-detection time is the fallback if clocks disagree.
    end = last if last and batch.t0 < last <= seen + 1 else seen
    return report_phase(
        "runyard",
        "executions",
        f"over HTTP, {per_request} per request",
        args.count,
        batch,
        end,
        CpuUsage(before, after, sessions, args.count, seen - batch.t0),
    )


# ---------------------------------------------------------------------------------------------
# Phase 2: plain Celery


def phase_plain(
    args, children: Children, env: dict[str, str], redis_url: str, broker_url: str
) -> tuple[float, CpuUsage]:
    import redis
    from celery.backends.redis import RedisBackend

    # The client polls the stored results instead of subscribing to each task's result channel
    # (what apply_async does by default for a later .get()); the worker still stores and
    # publishes every result. Runyard's API does not subscribe either.
    RedisBackend.on_task_call = lambda self, producer, task_id: None
    import kombu.pools

    from bench.plain_celery import app as plain_app
    from bench.plain_celery import noop

    plain_app.conf.broker_url = broker_url
    plain_app.conf.result_backend = redis_url

    deadline = time.monotonic() + args.timeout
    children.start(
        "plain-worker", worker_argv("bench.plain_celery", args.concurrency, "bench-plain"), env
    )
    sessions = {"worker": children.procs["plain-worker"].pid}
    client = redis.Redis.from_url(redis_url)

    def alive() -> None:
        children.check("plain-worker")

    def make_submit():
        def submit():
            return noop.apply_async(args=[{}], queue="default").id

        return submit

    def keys(ids: list) -> list[str]:
        return [f"celery-task-meta-{task_id}" for task_id in ids]

    def stored(ids: list) -> Callable[[], bool]:
        names = keys(ids)

        def check() -> bool:
            found = sum(client.exists(*names[i : i + 1000]) for i in range(0, len(names), 1000))
            state["found"] = found
            return found >= len(names)

        return check

    state = {"found": 0}
    try:
        if args.warmup:
            warm = Batch(args.warmup, args.threads, make_submit)
            warm.start()
            warm.finish(deadline)
            wait_until(stored(warm.results), deadline, "plain celery warm-up", alive)
            log(f"  warm-up: {args.warmup} tasks in {time.time() - warm.t0:.1f} s")
        batch = Batch(args.count, args.threads, make_submit)
        before = cpu_snapshot()
        batch.start()
        try:
            batch.finish(deadline)
            wait_until(stored(batch.results), deadline, "plain celery", alive)
        except BenchError:
            elapsed = time.time() - batch.t0
            done = state["found"]
            log(
                f"  FAILED after {elapsed:.1f} s: {done}/{args.count} results stored "
                f"({done / elapsed:.1f}/s so far), {batch.submitted} submitted"
            )
            raise
        seen = time.time()
        after = cpu_snapshot()
        names = keys(batch.results)
        last = 0.0
        for i in range(0, len(names), 1000):
            for raw in client.mget(names[i : i + 1000]):
                meta = json.loads(raw)
                if meta["status"] != "SUCCESS":
                    raise BenchError(f"a task ended {meta['status']}: {meta.get('result')!r}")
                done_at = dt.datetime.fromisoformat(meta["date_done"])
                if done_at.tzinfo is None:
                    done_at = done_at.replace(tzinfo=dt.UTC)
                last = max(last, done_at.timestamp())
    finally:
        client.close()
        with contextlib.suppress(Exception):
            plain_app.pool.force_close_all()
        # The next round (--rounds) builds its pools again: these are closed for good.
        plain_app._pool = None
        plain_app.amqp._producer_pool = None
        kombu.pools.reset()
    end = last if batch.t0 < last <= seen + 1 else seen
    return report_phase(
        "plain celery",
        "tasks",
        "with apply_async",
        args.count,
        batch,
        end,
        CpuUsage(before, after, sessions, args.count, seen - batch.t0),
    )


def report_phase(name, noun, how, count, batch, end, cpu: CpuUsage) -> tuple[float, CpuUsage]:
    """Print a phase's submit rate, CPU per item and end-to-end rate; return the rate and CPU."""
    submit_seconds = batch.t_submitted - batch.t0
    log(f"  submitted {count} in {submit_seconds:.2f} s ({count / submit_seconds:.1f}/s {how})")
    log(cpu.report())
    log(rate_line(name, noun, count, end - batch.t0))
    return count / (end - batch.t0), cpu


def gap_report(runyard: tuple[float, CpuUsage], plain: tuple[float, CpuUsage]) -> list[str]:
    """What a ratio of 0.9 would ask of the machine, and where Runyard's CPU goes beyond plain
    Celery's."""
    (_ours, cpu), (theirs, base) = runyard, plain
    target = 0.9 * theirs
    cores = os.cpu_count() or 1
    budget = cores * 1000 / target
    label, percent = cpu.busiest()
    own = sum(cpu.groups.values()) - cpu.groups.get("other", 0.0)
    extra = ", ".join(
        f"{group} {cpu.groups.get(group, 0.0) - base.groups.get(group, 0.0):+.2f}"
        for group in dict.fromkeys([*cpu.groups, *base.groups])
    )
    return [
        f"at 0.9:       {target:.1f}/s, so at most {budget:.2f} ms of machine CPU per execution "
        f"with all {cores} cores busy; runyard used {own:.2f} without `other` (whole machine "
        f"{cpu.machine_ms:.2f}, {cpu.busy:.0f}% busy; busiest process {label} at {percent:.0f}% "
        "of a core)",
        f"cpu ms/item, runyard minus plain celery: {extra}",
    ]


def median_round(
    rounds: list[dict[str, tuple[float, CpuUsage] | None]],
) -> dict[str, tuple[float, CpuUsage] | None]:
    """Print each round's rates and ratio; the round whose ratio is the median among the
    rounds with both phases (the lower of the two middle ones for an even count), or the last
    round when none has both. Each round has an organization of its own in one database: the
    executions table grows by --count + --warmup rows a round."""
    complete = []
    for number, rates in enumerate(rounds, 1):
        runyard, plain = rates["runyard"], rates["plain"]
        if runyard and plain:
            ratio = runyard[0] / plain[0]
            complete.append((ratio, number, rates))
            log(
                f"round {number}: runyard {runyard[0]:.1f}/s, plain celery {plain[0]:.1f}/s, "
                f"ratio {ratio:.2f}"
            )
        else:
            log(f"round {number}: incomplete")
    if not complete:
        return rounds[-1]
    complete.sort(key=lambda item: item[0])
    _, number, rates = complete[(len(complete) - 1) // 2]
    ratios = ", ".join(f"{item[0]:.2f}" for item in complete)
    log(f"ratios, lowest first: {ratios}; the median round ({number}) below")
    return rates


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000, help="measured items per phase")
    parser.add_argument("--threads", "--client-threads", type=int, default=8, help="client threads")
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    parser.add_argument("--warmup", type=int, default=200, help="uncounted items first")
    parser.add_argument("--timeout", type=float, default=75.0, help="seconds per phase, at most")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="submit through the batch endpoint, this many items per request (0: one by one)",
    )
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database when REDIS_URL")
    parser.add_argument(
        "--broker-url",
        help="amqp://user:password@host:5672/ : both phases on this RabbitMQ, in a vhost of "
        f"the benchmark's own ({BENCH_VHOST}, made again before each phase); Redis stays the "
        "result backend (default: the Redis is the broker too)",
    )
    parser.add_argument("--keep-db", action="store_true", help=f"leave the {DATABASE} database")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the phases this many times, alternating, and report the round with the "
        "median ratio (on a virtual machine whose neighbours take CPU at will, one round's "
        "rates can be half of the next one's)",
    )
    parser.add_argument(
        "--only", choices=["runyard", "plain"], help="run one phase (for profiling)"
    )
    args = parser.parse_args(argv)
    if args.count < 1 or args.threads < 1 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--count, --threads, --concurrency and --rounds must be positive")
    if args.batch_size and (args.batch_size > 1000 or args.count % args.batch_size):
        parser.error("--batch-size must be 1..1000 and divide --count")

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    # Even when started in the background with SIGINT ignored, Ctrl-C / kill -INT cleans up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)

    cleanups: list[Callable[[], None]] = []
    children = Children()
    started = time.monotonic()
    status = 0
    try:
        log(
            f"throughput: {args.count} items, {args.threads} client threads, "
            f"worker -P prefork -c {args.concurrency}, {os.cpu_count()} CPUs; logs in {LOG_DIR}"
        )
        database_url = setup_database(cleanups, args.keep_db)
        redis_url = setup_redis(cleanups, args.redis_db)
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        # Same broker and backend for both phases: nothing may point Runyard elsewhere.
        for name in ("RUNYARD_BROKER_URL", "RUNYARD_RESULT_BACKEND"):
            env.pop(name, None)
        os.environ["REDIS_URL"] = redis_url
        broker_url = redis_url
        if args.broker_url:
            broker_url = rabbitmq_vhost(args.broker_url)
            # Runyard's broker, and plain Celery's (bench/plain_celery.py).
            env["RUNYARD_BROKER_URL"] = env["BENCH_BROKER_URL"] = broker_url
            cleanups.append(
                lambda: subprocess.run(["rabbitmqctl", "delete_vhost", BENCH_VHOST], check=False)
            )
            log(f"broker: RabbitMQ, vhost {BENCH_VHOST}")

        phases = [
            (
                "runyard",
                lambda: phase_runyard(args, children, env, database_url),
                ["api", "runyard-worker"],
            ),
            (
                "plain",
                lambda: phase_plain(args, children, env, redis_url, broker_url),
                ["plain-worker"],
            ),
        ]
        rounds: list[dict[str, tuple[float, CpuUsage] | None]] = []
        for round_number in range(1, args.rounds + 1):
            rates = {"runyard": None, "plain": None}
            rounds.append(rates)
            for name, run, procs in phases:
                if args.only and args.only != name:
                    continue
                log(f"phase {name}" + (f", round {round_number}:" if args.rounds > 1 else ":"))
                flushdb(redis_url)
                if args.broker_url:
                    rabbitmq_vhost(args.broker_url)
                try:
                    rates[name] = run()
                except BenchError as exc:
                    log(f"  {name} FAILED: {exc}")
                    status = 1
                finally:
                    for proc in reversed(procs):
                        children.stop(proc)

        log("")
        if args.rounds > 1 and not args.only:
            rates = median_round(rounds)
        runyard, plain = rates["runyard"], rates["plain"]
        log(f"runyard:      {f'{runyard[0]:.1f}/s' if runyard else 'n/a'}")
        log(f"plain celery: {f'{plain[0]:.1f}/s' if plain else 'n/a'}")
        if runyard and plain:
            log(f"ratio:        {runyard[0] / plain[0]:.2f}")
            for line in gap_report(runyard, plain):
                log(line)
        else:
            log("ratio:        n/a")
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
