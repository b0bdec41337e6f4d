#!/usr/bin/env python
"""10,000 schedules due in the same minute: Runyard's beat against plain celery beat.

    .venv/bin/python bench/schedules.py [--count 10000] [--redis-db 12]
    # Runyard's phase on RabbitMQ (a vhost of the benchmark's own), without the plain phase:
    .venv/bin/python bench/schedules.py --broker-url amqp://guest:guest@127.0.0.1:5672/

Phase 1, Runyard: N schedules (`* * * * *`, UTC, defaults for every policy) of one agent are
inserted straight into a fresh database (creating them over the API is not what is measured),
then `celery -A workers beat` (workers/scheduler.py) starts before a minute boundary. Measured:
seconds from the boundary until all N executions are stored (all N rows committed) and
published (all N messages in Redis), both polled every 20 ms; also
when the last `dispatched_at` stamp, written after each published batch, landed. No worker runs:
the messages stay queued.

Phase 2, plain Celery: `celery -A bench.plain_beat beat` with N crontab(minute="*") entries, each
publishing a plain task. Measured: seconds from the boundary until N messages sit in Redis
(polled every 20 ms).

Both phases run one after the other in the same invocation, each waiting for a minute boundary
(about two minutes in all). The load average is printed before each phase: other work on the
machine slows both. DATABASE_URL set -> a fresh database `runyard_bench_schedules` there (dropped
at the end); REDIS_URL set -> its database --redis-db (flushed before each phase; refused when a
test run has claimed it). Unset -> the embedded servers of bench/throughput.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import (  # noqa: E402 - after the sys.path fix above
    BENCH_VHOST,
    BIN,
    BenchError,
    Children,
    cpu_groups,
    cpu_snapshot,
    flushdb,
    libpq_url,
    log,
    rabbitmq_vhost,
    setup_redis,
)

DATABASE = "runyard_bench_schedules"
RUNYARD_QUEUE = "default"
PLAIN_QUEUE = "plain-beat"
# Beat must be up and idle before the boundary it is measured from.
MIN_LEAD_SECONDS = 20


def setup_database(cleanups: list[Callable[[], None]]) -> str:
    import psycopg
    from sqlalchemy.engine import make_url

    from app.config import sqlalchemy_url

    given = os.environ.get("DATABASE_URL", "")
    if given:
        server_url = make_url(sqlalchemy_url(given))
    else:
        from app.embedded import EmbeddedPostgres

        postgres = EmbeddedPostgres(ROOT / ".runyard" / "bench-pg", database=DATABASE)
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
    return server_url.set(database=DATABASE).render_as_string(hide_password=False)


def next_boundary() -> dt.datetime:
    now = dt.datetime.now(dt.UTC)
    boundary = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    if (boundary - now).total_seconds() < MIN_LEAD_SECONDS:
        boundary += dt.timedelta(minutes=1)
    return boundary


def sleep_until(moment: dt.datetime) -> None:
    delay = (moment - dt.datetime.now(dt.UTC)).total_seconds()
    if delay > 0:
        time.sleep(delay)


def queued_messages(redis_client, queue: str) -> int:
    keys = [queue, *(f"{queue}:{step}" for step in range(1, 10))]
    with redis_client.pipeline() as pipe:
        for key in keys:
            pipe.llen(key)
        return sum(pipe.execute())


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def seed(database_url: str, count: int, boundary: dt.datetime) -> None:
    from sqlalchemy import text

    from app.agents import services as agents
    from app.db import db
    from app.migrate import upgrade
    from app.orgs import services as orgs
    from app.orgs.services import Principal

    upgrade(database_url)
    db.configure(database_url)
    try:
        with db.session() as session:
            org, _token = orgs.create_org(session, "bench")
            principal = Principal(org.id, org.name, org.id, "bench", "admin")
            agent = agents.create(
                session,
                principal,
                {
                    "name": "noop",
                    "runtime": {"type": "python", "entrypoint": "runyard_examples.text:noop"},
                },
            )
            session.execute(
                text(
                    """
                    INSERT INTO schedules (id, org_id, name, target_kind, target_name, agent_id,
                        cron, timezone, input, enabled, overlap, catchup, catchup_window_seconds,
                        pause_after_failures, next_fire_at)
                    SELECT gen_random_uuid(), :org, 'bench-' || n, 'agent', 'noop', :agent,
                        '* * * * *', 'UTC', jsonb_build_object('n', n), true, 'skip', 'latest',
                        3600, 0, :boundary
                    FROM generate_series(1, :count) AS n
                    """
                ),
                {"org": org.id, "agent": agent.id, "boundary": boundary, "count": count},
            )
            session.commit()
    finally:
        db.dispose()


def message_counter(redis_url: str, broker_url: str | None) -> Callable[[], int]:
    """Messages waiting in RUNYARD_QUEUE: Redis's lists, or RabbitMQ's count (passive declare)."""
    if not broker_url:
        import redis

        client = redis.Redis.from_url(redis_url)
        return lambda: queued_messages(client, RUNYARD_QUEUE)
    import amqp
    from kombu import Connection

    connection = Connection(broker_url)
    connection.connect()

    def count() -> int:
        channel = connection.channel()
        try:
            return channel.queue_declare(RUNYARD_QUEUE, passive=True)[1]
        except amqp.exceptions.NotFound:
            return 0
        finally:
            if channel.is_open:
                channel.close()

    return count


def runyard_phase(args, children: Children, database_url: str, redis_url: str) -> dict:
    import psycopg
    from sqlalchemy.engine import make_url

    flushdb(redis_url)
    broker_url = rabbitmq_vhost(args.broker_url) if args.broker_url else None
    boundary = next_boundary()
    seed(database_url, args.count, boundary)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "RUNYARD_SWEEP_INTERVAL_SECONDS": "3600",
        # Measured: every fire published at once. Flow control's fair window (32 messages of an
        # organization in the broker, the rest in PostgreSQL) would hold all but 32 back, and
        # the wait for 10,000 messages would never end.
        "RUNYARD_FAIR_WINDOW": "0",
    }
    env.pop("RUNYARD_BROKER_URL", None)
    if broker_url:
        env["RUNYARD_BROKER_URL"] = broker_url
    beat = children.start(
        "runyard-beat",
        [
            BIN / "celery",
            "-A",
            "workers",
            "beat",
            "-l",
            "INFO",
            "-s",
            children.log_path("runyard-beat-schedule"),
            f"--pidfile={children.log_path('runyard-beat-pid')}",
        ],
        env,
    )
    log(f"runyard: {args.count} schedules due at {boundary:%H:%M:%S}; {load()}")
    sleep_until(boundary - dt.timedelta(seconds=1))
    before = cpu_snapshot()
    sleep_until(boundary)
    dsn = libpq_url(make_url(database_url))
    waiting = message_counter(redis_url, broker_url)
    deadline = time.monotonic() + args.timeout
    # Stored: every row committed (visible to this connection). Published: every message in
    # Redis. Both polled every 20 ms. Stamped: the last dispatched_at, written after each
    # published batch.
    stored_at = in_redis_at = None
    with psycopg.connect(dsn, autocommit=True) as conn:
        while stored_at is None or in_redis_at is None:
            children.check("runyard-beat")
            if in_redis_at is None and waiting() >= args.count:
                in_redis_at = dt.datetime.now(dt.UTC)
            stored = conn.execute("SELECT count(*) FROM executions").fetchone()[0]
            if stored_at is None and stored >= args.count:
                stored_at = dt.datetime.now(dt.UTC)
            if time.monotonic() > deadline:
                raise BenchError(f"runyard: not all stored and published after {args.timeout}s")
            time.sleep(0.02)
        while True:
            stamped, last_stamped = conn.execute(
                "SELECT count(dispatched_at), max(dispatched_at) FROM executions"
            ).fetchone()
            if stamped >= args.count or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    after = cpu_snapshot()
    messages = waiting()
    cpu = cpu_groups(before, after, {"beat": beat.pid})
    children.stop("runyard-beat")
    return {
        "stored": (stored_at - boundary).total_seconds(),
        "published": (in_redis_at - boundary).total_seconds(),
        "stamped": (last_stamped - boundary).total_seconds(),
        "messages": messages,
        "beat_cpu": cpu["beat"],
        "postgres_cpu": cpu["postgres"],
    }


def plain_phase(args, children: Children, redis_url: str) -> dict:
    import redis

    flushdb(redis_url)
    boundary = next_boundary()
    env = {**os.environ, "REDIS_URL": redis_url, "BENCH_SCHEDULES": str(args.count)}
    beat = children.start(
        "plain-beat",
        [
            BIN / "celery",
            "-A",
            "bench.plain_beat",
            "beat",
            "-l",
            "INFO",
            "-s",
            children.log_path("plain-beat-schedule"),
            f"--pidfile={children.log_path('plain-beat-pid')}",
        ],
        env,
    )
    log(f"plain celery beat: {args.count} crontab entries due at {boundary:%H:%M:%S}; {load()}")
    client = redis.Redis.from_url(redis_url)
    sleep_until(boundary - dt.timedelta(seconds=1))
    before = cpu_snapshot()
    sleep_until(boundary)
    # Plain beat may need far longer than the timeout: then what it published so far is the
    # figure, and the time for all of them is not claimed.
    deadline = time.monotonic() + args.plain_timeout
    while True:
        children.check("plain-beat")
        published = queued_messages(client, PLAIN_QUEUE)
        if published >= args.count or time.monotonic() > deadline:
            done = dt.datetime.now(dt.UTC)
            break
        time.sleep(0.02)
    after = cpu_snapshot()
    cpu = cpu_groups(before, after, {"beat": beat.pid})
    children.stop("plain-beat")
    return {
        "published": published,
        "seconds": (done - boundary).total_seconds(),
        "beat_cpu": cpu["beat"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="schedules due in the minute")
    parser.add_argument("--redis-db", type=int, default=12, help="Redis database when REDIS_URL")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for Runyard, at most")
    parser.add_argument(
        "--broker-url",
        help="amqp://user:password@host:5672/ : Runyard's phase on this RabbitMQ (a vhost of "
        "the benchmark's own, rabbitmqctl as root); the plain phase is not run",
    )
    parser.add_argument(
        "--plain-timeout",
        type=float,
        default=60.0,
        help="seconds plain beat gets; what it published by then is reported",
    )
    args = parser.parse_args()
    cleanups: list[Callable[[], None]] = []
    children = Children()
    try:
        database_url = setup_database(cleanups)
        redis_url = setup_redis(cleanups, args.redis_db)
        if args.broker_url:
            cleanups.append(
                lambda: subprocess.run(["rabbitmqctl", "delete_vhost", BENCH_VHOST], check=False)
            )
        ours = runyard_phase(args, children, database_url, redis_url)
        plain = None if args.broker_url else plain_phase(args, children, redis_url)
        flushdb(redis_url)
    except BenchError as exc:
        log(f"bench failed: {exc}")
        return 1
    finally:
        children.stop_all()
        for cleanup in reversed(cleanups):
            cleanup()
    n = args.count
    log(
        f"\n{n} schedules due in the same minute, seconds from the minute boundary:\n"
        f"  runyard beat      stored {ours['stored']:.2f} s, published {ours['published']:.2f} s "
        f"({ours['messages']} messages in {'RabbitMQ' if args.broker_url else 'Redis'}), "
        f"dispatched_at stamped {ours['stamped']:.2f} s; beat CPU {ours['beat_cpu']:.2f} s, "
        f"PostgreSQL CPU {ours['postgres_cpu']:.2f} s\n"
        + (
            "  plain celery beat not run (--broker-url)"
            if plain is None
            else f"  plain celery beat published {n} in {plain['seconds']:.2f} s"
            if plain["published"] >= n
            else f"  plain celery beat published {plain['published']} of {n} in "
            f"{plain['seconds']:.2f} s (stopped there: --plain-timeout)"
        )
        + ("" if plain is None else f"; beat CPU {plain['beat_cpu']:.2f} s")
        + "\n"
        "  target: at most 2 s for Runyard; published anchor: django-celery-beat about 3 minutes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
