#!/usr/bin/env python
"""What an Idempotency-Key costs a submit: API-side latency of keyed and unkeyed submits.

    .venv/bin/python bench/idempotency.py [--count 100] [--warmup 20]

In one process, the WSGI app (no HTTP server, no worker: executions stay queued, messages go to
Redis) takes, in turn, an unkeyed submit, a submit with a fresh key, and a repeat of that keyed
submit (a replay); each timed with time.perf_counter around the call. Prints the median and the
90th percentile of each, then the SQL statements each kind sends (psycopg cursor executes,
counted over a few more requests after the timing, so the count costs the timing nothing).

Servers as bench/throughput.py (DATABASE_URL / REDIS_URL or embedded ones, a fresh database).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import (  # noqa: E402 - after the sys.path fix above
    AGENT,
    ENTRYPOINT,
    create_org,
    log,
    setup_database,
    setup_redis,
)

SUBMIT = f"/api/v1/agents/{AGENT}/executions"
BODY = {"input": {"text": "hello"}}


def timed(call: Callable[[], object]) -> float:
    began = time.perf_counter()
    call()
    return (time.perf_counter() - began) * 1000


def summary(label: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[int(len(ordered) * 0.9) - 1]
    return f"  {label:<22} median {statistics.median(ordered):6.2f} ms   p90 {p90:6.2f} ms"


def count_statements(call: Callable[[], object], repeat: int) -> float:
    import psycopg

    original = psycopg.Cursor.execute
    calls = 0

    def counting(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        return original(self, *args, **kwargs)

    psycopg.Cursor.execute = counting
    try:
        for _ in range(repeat):
            call()
    finally:
        psycopg.Cursor.execute = original
    return calls / repeat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="timed requests of each kind")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests of each kind")
    parser.add_argument("--redis-db", type=int, default=12, help="Redis database when REDIS_URL")
    args = parser.parse_args(argv)

    cleanups: list[Callable[[], None]] = []
    try:
        database_url = setup_database(cleanups, keep=False)
        redis_url = setup_redis(cleanups, args.redis_db)
        os.environ.update({"DATABASE_URL": database_url, "REDIS_URL": redis_url})
        _org_id, token = create_org(database_url)

        from app import create_app
        from app.config import Config
        from app.db import db

        cleanups.append(db.dispose)
        client = create_app(Config.from_env()).test_client()
        headers = {"Authorization": f"Bearer {token}"}
        agent = {"name": AGENT, "runtime": {"type": "python", "entrypoint": ENTRYPOINT}}
        created = client.post("/api/v1/agents", json=agent, headers=headers)
        if created.status_code != 201:
            log(f"creating the agent failed: {created.get_json()}")
            return 1

        def submit(key: str | None = None):
            extra = {"Idempotency-Key": key} if key else {}
            response = client.post(SUBMIT, json=BODY, headers={**headers, **extra})
            if response.status_code != 202:
                raise RuntimeError(f"submit answered {response.status_code}: {response.json}")

        samples: dict[str, list[float]] = {"unkeyed": [], "keyed (first)": [], "keyed (replay)": []}
        for number in range(args.warmup + args.count):
            key = str(uuid.uuid4())
            unkeyed = timed(submit)
            first = timed(lambda key=key: submit(key))
            replay = timed(lambda key=key: submit(key))
            if number >= args.warmup:
                samples["unkeyed"].append(unkeyed)
                samples["keyed (first)"].append(first)
                samples["keyed (replay)"].append(replay)
        log(f"submit latency in the API process, {args.count} of each (time.perf_counter):")
        for label, values in samples.items():
            log(summary(label, values))
        key = str(uuid.uuid4())
        submit(key)
        statements = {
            "unkeyed": count_statements(submit, 10),
            "keyed (first)": count_statements(lambda: submit(str(uuid.uuid4())), 10),
            "keyed (replay)": count_statements(lambda: submit(key), 10),
        }
        log("SQL statements per request (psycopg cursor executes, token lookups cached):")
        for label, value in statements.items():
            log(f"  {label:<22} {value:.1f}")
        return 0
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


if __name__ == "__main__":
    sys.exit(main())
