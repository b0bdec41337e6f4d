#!/usr/bin/env python
"""Throughput with 1, 2 and 3 worker hosts, on Redis and on RabbitMQ, Runyard beside plain Celery,
and the CPU each process spends per execution: the figures behind the README's capacity model.

    .venv/bin/python bench/hosts.py [--hosts 1,2,3] [--brokers redis,rabbitmq] [--count 2000]
                                    [--warmup 200] [--threads 8] [--concurrency 2]
                                    [--timeout 90] [--systems runyard,plain]
                                    [--rabbitmq-url amqp://guest:guest@127.0.0.1:5672/]
                                    [--redis-db 12] [--keep-db]
    # a quick look: one host count, one broker, a few hundred executions
    .venv/bin/python bench/hosts.py --hosts 2 --brokers redis --count 300 --warmup 50

Needs root: each worker host is a network namespace with a veth pair (tests/hosts/netns.py),
reaching PostgreSQL, Redis and the broker through socat forwarders on the host-side address (the
services listen on loopback). For every broker and host count, two phases, one after the other:

- runyard: `runyard api` in the root namespace; in each host one `celery -A workers worker -P
  prefork -c --concurrency -Q default`. --threads client threads POST
  /api/v1/agents/noop/executions (a no-op python agent) over keep-alive connections; done when
  every execution is `succeeded` in PostgreSQL.
- plain: in each host one `celery -A bench.plain_celery worker` with the same pool on the same
  broker (results in Redis, as plain Celery hands them back); as many client threads call
  apply_async on a no-op task; done when every result is stored.

Each phase first checks that every host's worker answers a ping, then runs --warmup uncounted
items. Rate = --count / (first submit -> last end, from the stored timestamps).

CPU per item (ms) over the measured window, from /proc: the API (gunicorn's session), the
workers' main processes and pool processes (summed over hosts), PostgreSQL (this database's
backends plus the server's own processes; other databases' backends go to `other`), Redis,
RabbitMQ (beam.smp), the socat forwarders (the price of namespaces on one machine: a real
network costs the kernel instead), this client, kernel threads (softirq network work among
them), and every other process on the machine (`other`:
other test runs share this machine and its servers; Redis and RabbitMQ cannot be split per
client, so their figures include whatever else used them meanwhile; the load average is printed
before each phase); `own` sums every group but `other`. The capacity lines divide a core's
1000 ms by the ms per execution of PostgreSQL, the brokers, the API and the workers (the rate
one core of each would sustain if nothing else limited it), and the machine's cores by `own`.

Servers: DATABASE_URL (a fresh database `runyard_bench_hosts`, dropped at the end unless
--keep-db) and REDIS_URL (a database number of its own, as bench/throughput.py claims it) must
point at servers on loopback, or be unset for the embedded ones. RabbitMQ: --rabbitmq-url; by
default a vhost of the bench's own (`runyard-bench-<pid>`, made and deleted with rabbitmqctl) on
127.0.0.1:5672 as guest. Every process runs in its own session and is killed with its group; the
namespaces, veths and forwarders are removed at the end (and by the next run if this one was
killed outright).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.host_cpu import Row, cpu_between, loadavg, snapshot, tables  # noqa: E402
from bench.throughput import (  # noqa: E402 - after the sys.path fix above
    BIN,
    LOG_DIR,
    Batch,
    BenchError,
    Children,
    HttpSubmit,
    flushdb,
    free_port,
    libpq_url,
    log,
    setup_database,
    setup_redis,
    wait_http,
    wait_until,
)
from tests.hosts import netns  # noqa: E402

DATABASE = "runyard_bench_hosts"
AGENT = "noop"
ENTRYPOINT = "runyard_examples.text:noop"
PLAIN_QUEUE = "plain-bench"
RABBITMQ_HOST = "amqp://guest:guest@127.0.0.1:5672/"
# ---------------------------------------------------------------------------------------------
# Brokers and the processes in the hosts


@dataclass
class Broker:
    name: str
    url: str
    cleanup: Callable[[], None] | None = None


def rabbitmq_vhost(url: str | None) -> Broker:
    """The given RabbitMQ URL as is, or a vhost of this run's own on the local server."""
    if url:
        return Broker("rabbitmq", url)
    vhost = f"runyard-bench-{os.getpid()}"

    def ctl(*args: str) -> None:
        done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True)
        if done.returncode:
            raise BenchError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()[-300:]}")

    ctl("add_vhost", vhost)
    ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    log(f"rabbitmq: vhost {vhost} on 127.0.0.1:5672")
    return Broker("rabbitmq", RABBITMQ_HOST + vhost, lambda: ctl("delete_vhost", vhost))


def node_name(system: str, host: netns.Host) -> str:
    return f"bench-{system}-h{host.index}@{socket.gethostname()}"


def start_workers(
    children: Children,
    fleet: netns.Fleet,
    system: str,
    app_module: str,
    queue: str,
    concurrency: int,
    env_for: Callable[[netns.Host], dict[str, str]],
) -> tuple[set[int], list[str]]:
    """One worker in each host; the session ids of the workers and their node names."""
    sessions, nodes = set(), []
    for host in fleet.hosts:
        nodes.append(node_name(system, host))
        argv = netns.celery_worker_argv(app_module, queue, concurrency, nodes[-1])
        argv[argv.index("INFO")] = "WARNING"  # no line per task: its cost is not the product's
        name = f"{system}-h{host.index}"
        sessions.add(children.start(name, host.argv(argv), env_for(host)).pid)
    return sessions, nodes


def wait_for_pongs(plain_app, nodes: list[str], deadline: float, alive: Callable[[], None]) -> None:
    """Until every worker answers a remote-control ping (connected to the broker, consuming)."""
    missing = set(nodes)
    while missing:
        alive()
        if time.monotonic() > deadline:
            raise BenchError(f"no answer to a ping from {sorted(missing)}")
        for reply in plain_app.control.ping(destination=sorted(missing), timeout=1.0):
            missing -= set(reply)


def point_plain_client(broker_url: str, redis_url: str):
    """bench.plain_celery's app, publishing to `broker_url` with results in Redis; its pools
    are rebuilt when the broker changes between phases."""
    from celery.backends.redis import RedisBackend

    from bench.plain_celery import app as plain_app

    # As in bench/throughput.py: the client polls the stored results instead of subscribing.
    RedisBackend.on_task_call = lambda self, producer, task_id: None
    if plain_app.conf.broker_url != broker_url or plain_app.conf.result_backend != redis_url:
        with contextlib.suppress(Exception):
            plain_app.pool.force_close_all()
        plain_app._pool = None
        plain_app.amqp._producer_pool = None
        plain_app.conf.broker_url = broker_url
        plain_app.conf.result_backend = redis_url
    return plain_app


# ---------------------------------------------------------------------------------------------
# Phases


@dataclass
class Bench:
    args: argparse.Namespace
    children: Children
    database_url: str
    redis_url: str

    def env(self, broker_url: str) -> dict[str, str]:
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "RUNYARD_BROKER_URL": broker_url,
            "PYTHONPATH": str(ROOT),
        }
        env.pop("RUNYARD_RESULT_BACKEND", None)
        return env


def create_org(database_url: str, name: str) -> tuple[str, str]:
    """An organization of the phase's own (each phase counts its executions by organization)."""
    from app.db import db
    from app.orgs import services

    db.configure(database_url)
    try:
        with db.session() as session:
            org, token = services.create_org(session, name)
            session.commit()
            return str(org.id), token
    finally:
        db.dispose()


def create_agent(port: int, token: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    definition = {"name": AGENT, "runtime": {"type": "python", "entrypoint": ENTRYPOINT}}
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    conn.request("POST", "/api/v1/agents", json.dumps(definition).encode(), headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    if response.status != 201:
        raise BenchError(f"creating the agent answered {response.status}: {body[:300]!r}")


def measure(
    args,
    row: Row,
    submit: Callable[[], Callable[[], object]],
    done: Callable[[Batch], float],
    sessions: tuple[int, set[int]],
    alive: Callable[[], None],
    deadline: float,
) -> Row:
    """Warm up, then the measured batch; `done(batch)` waits and returns the last end (epoch)."""
    if args.warmup:
        warm = Batch(args.warmup, args.threads, submit)
        warm.start()
        warm.finish(deadline)
        done(warm)
    batch = Batch(args.count, args.threads, submit)
    before = snapshot()
    batch.start()
    batch.finish(deadline)
    last = done(batch)
    seen = time.time()
    after = snapshot()
    alive()
    end = last if batch.t0 < last <= seen + 1 else seen
    row.rate = args.count / (end - batch.t0)
    row.submit_rate = args.count / (batch.t_submitted - batch.t0)
    row.cpu = cpu_between(before, after, sessions, DATABASE, args.count, seen - batch.t0)
    return row


def phase_runyard(bench: Bench, fleet: netns.Fleet, broker: Broker, plain_app) -> Row:
    import psycopg
    from sqlalchemy.engine import make_url

    args, children = bench.args, bench.children
    row = Row(broker.name, len(fleet.hosts), "runyard")
    deadline = time.monotonic() + args.timeout
    org_id, token = create_org(bench.database_url, f"bench-{broker.name}-{len(fleet.hosts)}")
    env = bench.env(broker.url)
    port = free_port()
    api = children.start("api", [BIN / "runyard", "api", "--port", str(port)], env).pid
    wait_http(children, "api", f"http://127.0.0.1:{port}/healthz", timeout=30)
    create_agent(port, token)
    workers, nodes = start_workers(
        children,
        fleet,
        "runyard",
        "workers",
        "default",
        args.concurrency,
        lambda host: {**env, **fleet.env(host)},
    )

    def alive() -> None:
        for name in list(children.procs):
            children.check(name)

    wait_for_pongs(plain_app, nodes, deadline, alive)
    path = f"/api/v1/agents/{AGENT}/executions"
    poll = psycopg.connect(libpq_url(make_url(bench.database_url)), autocommit=True)
    state = {"done": 0, "last": 0.0}

    def done(batch: Batch) -> float:
        target = state["done"] + batch.submitted

        def check() -> bool:
            ok, bad, last = poll.execute(
                "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE "
                "status IN ('failed', 'timed_out', 'cancelled')), "
                "extract(epoch FROM max(finished_at))::float8 FROM executions WHERE org_id = %s",
                (org_id,),
            ).fetchone()
            if bad:
                raise BenchError(f"{bad} execution(s) did not succeed")
            state["last"] = last or 0.0
            return ok >= target

        wait_until(check, deadline, "runyard", alive)
        state["done"] = target
        return state["last"]

    try:
        return measure(
            args,
            row,
            lambda: HttpSubmit(port, path, token),
            done,
            (api, workers),
            alive,
            deadline,
        )
    finally:
        poll.close()


def phase_plain(bench: Bench, fleet: netns.Fleet, broker: Broker, plain_app) -> Row:
    import redis

    from bench.plain_celery import noop

    args, children = bench.args, bench.children
    row = Row(broker.name, len(fleet.hosts), "plain celery")
    deadline = time.monotonic() + args.timeout

    def env_for(host: netns.Host) -> dict[str, str]:
        inside = fleet.env(host)
        # bench.plain_celery takes REDIS_URL for its broker and results; Celery's own
        # CELERY_BROKER_URL overrides the broker.
        return {
            **bench.env(broker.url),
            "REDIS_URL": inside["REDIS_URL"],
            "CELERY_BROKER_URL": inside["RUNYARD_BROKER_URL"],
        }

    workers, nodes = start_workers(
        children, fleet, "plain", "bench.plain_celery", PLAIN_QUEUE, args.concurrency, env_for
    )

    def alive() -> None:
        for name in list(children.procs):
            children.check(name)

    wait_for_pongs(plain_app, nodes, deadline, alive)
    client = redis.Redis.from_url(bench.redis_url)

    def submit() -> Callable[[], object]:
        return lambda: noop.apply_async(args=[{}], queue=PLAIN_QUEUE).id

    def done(batch: Batch) -> float:
        names = [f"celery-task-meta-{task_id}" for task_id in batch.results]

        def check() -> bool:
            chunks = range(0, len(names), 1000)
            return sum(client.exists(*names[i : i + 1000]) for i in chunks) >= len(names)

        wait_until(check, deadline, "plain celery", alive)
        last = 0.0
        for i in range(0, len(names), 1000):
            for raw in client.mget(names[i : i + 1000]):
                meta = json.loads(raw)
                if meta["status"] != "SUCCESS":
                    raise BenchError(f"a task ended {meta['status']}: {meta.get('result')!r}")
                stamp = dt.datetime.fromisoformat(meta["date_done"])
                last = max(last, stamp.replace(tzinfo=stamp.tzinfo or dt.UTC).timestamp())
        return last

    try:
        return measure(args, row, submit, done, (-1, workers), alive, deadline)
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------


def run_broker(bench: Bench, broker: Broker, rows: list[Row]) -> int:
    """Every host count and system on one broker; 1 if a phase failed."""
    status = 0
    plain_app = point_plain_client(broker.url, bench.redis_url)
    phases = {"runyard": phase_runyard, "plain": phase_plain}
    for count in bench.args.hosts:
        services = {
            "DATABASE_URL": bench.database_url,
            "REDIS_URL": bench.redis_url,
            "RUNYARD_BROKER_URL": broker.url,
        }
        with netns.Fleet(count, services) as fleet:
            for system in bench.args.systems:
                log(f"{broker.name}, {count} host(s), {system} (load {loadavg()}):")
                flushdb(bench.redis_url)
                try:
                    row = phases[system](bench, fleet, broker, plain_app)
                    log(
                        f"  {row.rate:.1f}/s (submits {row.submit_rate:.1f}/s), "
                        f"cpu {row.cpu.machine_ms:.2f} ms/item on the machine"
                    )
                except BenchError as exc:
                    row = Row(broker.name, count, system, error=str(exc))
                    log(f"  FAILED: {exc}")
                    status = 1
                finally:
                    bench.children.stop_all()
                rows.append(row)
    return status


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def listed(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
        def parse(value: str) -> list[str]:
            items = [item.strip() for item in value.split(",") if item.strip()]
            if not items or set(items) - set(choices):
                raise argparse.ArgumentTypeError(f"a comma-separated list of {choices}")
            return items

        return parse

    def host_counts(value: str) -> list[int]:
        counts = [int(item) for item in value.split(",")]
        if not counts or not all(1 <= c <= netns.MAX_HOSTS for c in counts):
            raise argparse.ArgumentTypeError(f"host counts from 1 to {netns.MAX_HOSTS}")
        return counts

    parser.add_argument("--hosts", type=host_counts, default=[1, 2, 3], help="e.g. 1,2,3")
    parser.add_argument(
        "--brokers", type=listed(("redis", "rabbitmq")), default=["redis", "rabbitmq"]
    )
    parser.add_argument(
        "--systems", type=listed(("runyard", "plain")), default=["runyard", "plain"]
    )
    parser.add_argument("--count", type=int, default=2000, help="measured items per phase")
    parser.add_argument("--warmup", type=int, default=200, help="uncounted items first")
    parser.add_argument("--threads", type=int, default=8, help="client threads")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes per host")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per phase, at most")
    parser.add_argument("--rabbitmq-url", default="", help="else a vhost of the run's own")
    parser.add_argument("--redis-db", type=int, default=12, help="Redis database when REDIS_URL")
    parser.add_argument("--keep-db", action="store_true", help=f"leave the {DATABASE} database")
    args = parser.parse_args(argv)
    if args.count < 1 or args.threads < 1 or args.concurrency < 1 or args.warmup < 0:
        parser.error("--count, --threads and --concurrency must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    from app.migrate import upgrade

    args = parse_args(argv)
    reason = netns.unavailable_reason()
    if reason:
        log(f"bench/hosts.py: {reason}")
        return 2

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    cleanups: list[Callable[[], None]] = []
    children = Children()
    rows: list[Row] = []
    started = time.monotonic()
    status = 0
    try:
        log(
            f"hosts: {args.count} items a phase, {args.threads} client threads, one worker "
            f"-P prefork -c {args.concurrency} per host, {os.cpu_count()} CPUs; logs in {LOG_DIR}"
        )
        database_url = setup_database(cleanups, args.keep_db, database=DATABASE)
        upgrade(database_url)
        redis_url = setup_redis(cleanups, args.redis_db)
        os.environ["REDIS_URL"] = redis_url
        bench = Bench(args, children, database_url, redis_url)
        for name in args.brokers:
            broker = Broker("redis", redis_url) if name == "redis" else None
            if broker is None:
                broker = rabbitmq_vhost(args.rabbitmq_url)
                if broker.cleanup:
                    cleanups.append(broker.cleanup)
            status |= run_broker(bench, broker, rows)
        for line in tables(rows):
            log(line)
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
