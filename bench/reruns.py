#!/usr/bin/env python
"""What reruns cost: a plain submit beside a single rerun, and a bulk rerun of many executions.

    .venv/bin/python bench/reruns.py [--count 1000] [--samples 50]

In one process, the WSGI app (no HTTP server, no worker: executions stay queued, messages go to
Redis). Submits `--count` executions and ends them `failed` with one UPDATE (as a worker's
finish would), then times: `--samples` plain submits and single reruns (median, p90, and the SQL
statements each sends: a plain submit must stay at its one INSERT), a bulk dry run over the
`--count` failed executions, and the bulk rerun of all of them (one transaction, batch inserts).

Servers as bench/throughput.py (DATABASE_URL / REDIS_URL or embedded ones, a fresh database).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.idempotency import count_statements, summary, timed  # noqa: E402 - after the path fix
from bench.throughput import (  # noqa: E402
    AGENT,
    ENTRYPOINT,
    create_org,
    log,
    setup_database,
    setup_redis,
)

SUBMIT = f"/api/v1/agents/{AGENT}/executions"
BODY = {"input": {"text": "hello"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="failed executions to rerun")
    parser.add_argument("--samples", type=int, default=50, help="timed submits and reruns")
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database when REDIS_URL")
    args = parser.parse_args(argv)

    cleanups: list[Callable[[], None]] = []
    try:
        database_url = setup_database(cleanups, keep=False, database="runyard_bench_reruns")
        redis_url = setup_redis(cleanups, args.redis_db)
        os.environ.update({"DATABASE_URL": database_url, "REDIS_URL": redis_url})
        _org_id, token = create_org(database_url)

        from sqlalchemy import text

        from app import create_app
        from app.config import Config
        from app.db import db

        cleanups.append(db.dispose)
        client = create_app(Config.from_env()).test_client()
        headers = {"Authorization": f"Bearer {token}"}
        agent = {"name": AGENT, "runtime": {"type": "python", "entrypoint": ENTRYPOINT}}
        if client.post("/api/v1/agents", json=agent, headers=headers).status_code != 201:
            log("creating the agent failed")
            return 1

        def post(path: str, body: dict, expected: int) -> dict:
            response = client.post(path, json=body, headers=headers)
            if response.status_code != expected:
                raise RuntimeError(f"{path} answered {response.status_code}: {response.json}")
            return response.json

        originals = [post(SUBMIT, BODY, 202)["id"] for _ in range(args.count)]
        with db.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE executions SET status = 'failed', attempt = 1, started_at = now(), "
                    'finished_at = now(), error = \'{"type": "runtime_error"}\' '
                    "WHERE id = ANY(CAST(:ids AS uuid[]))"
                ),
                {"ids": originals},
            )
        one = originals[0]
        rerun_path = f"/api/v1/executions/{one}/rerun"
        submits = [timed(lambda: post(SUBMIT, BODY, 202)) for _ in range(args.samples)]
        reruns = [timed(lambda: post(rerun_path, {}, 202)) for _ in range(args.samples)]
        log(f"API-side latency, {args.samples} of each (time.perf_counter):")
        log(summary("plain submit", submits))
        log(summary("single rerun", reruns))
        log("SQL statements per request (psycopg cursor executes):")
        plain_statements = count_statements(lambda: post(SUBMIT, BODY, 202), 10)
        rerun_statements = count_statements(lambda: post(rerun_path, {}, 202), 10)
        log(f"  plain submit           {plain_statements:.1f}")
        log(f"  single rerun           {rerun_statements:.1f}")
        bulk = {"filter": {"status": ["failed"]}, "max": 10000}
        began = time.perf_counter()
        matched = post("/api/v1/executions/rerun", {**bulk, "dry_run": True}, 200)["matched"]
        dry = time.perf_counter() - began
        began = time.perf_counter()
        ids = post("/api/v1/executions/rerun", bulk, 202)["ids"]
        real = time.perf_counter() - began
        log(f"bulk dry run over {matched} matches: {dry * 1000:.1f} ms")
        log(
            f"bulk rerun of {len(ids)}: {real * 1000:.1f} ms "
            f"({len(ids) / real:.0f} executions/s, one transaction)"
        )
        return 0
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


if __name__ == "__main__":
    sys.exit(main())
