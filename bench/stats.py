#!/usr/bin/env python
"""What GET /agents/{ref}/stats costs at volume, against the plain percentile query it replaces.

    .venv/bin/python bench/stats.py [--count 1000000] [--calls 20] [--window 7d]

Loads `--count` finished executions of one agent, spread over the last six days, into a fresh
database in one INSERT ... SELECT generate_series (about 90% succeeded, 7% failed, 2% timed out,
1% cancelled; durations log-normal around 200 ms, queue waits around 30 ms), plus a few queued
ones. Then runs the beat tally (app/stats/tally.py) until it has caught up, timed; then times
`--calls` requests of the stats endpoint through the WSGI app (no HTTP server) and prints the
median; then the median of the naive query (percentile_cont over the raw rows) for comparison.

Servers as bench/throughput.py (DATABASE_URL / REDIS_URL or embedded ones, a fresh database).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
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

DATABASE = "runyard_bench_stats"
SPREAD_SECONDS = 6 * 86400

# Finished executions with realistic shapes, their ids in time order (uuid from the row number).
LOAD = """
INSERT INTO executions (id, org_id, agent_id, version_id, agent_name, agent_version, status,
                        input, error, attempt, queue, queued_at, started_at, finished_at)
SELECT (lpad(to_hex(x.n), 32, '0'))::uuid, a.org_id, a.id, a.current_version_id, a.name,
       a.current_version, s.status, '{{}}',
       CASE WHEN s.status IN ('failed', 'timed_out')
            THEN jsonb_build_object('type', 'runtime_error', 'message', 'bench') END,
       1, 'default', f.finished_at - d.run - d.wait, f.finished_at - d.run, f.finished_at
FROM (SELECT n, random() AS r, random() AS u1, random() AS u2
      FROM generate_series(1, :count) AS n) x
CROSS JOIN (SELECT * FROM agents WHERE name = :agent) a
CROSS JOIN LATERAL (SELECT CASE WHEN x.r < 0.90 THEN 'succeeded' WHEN x.r < 0.97 THEN 'failed'
                               WHEN x.r < 0.99 THEN 'timed_out' ELSE 'cancelled' END AS status) s
CROSS JOIN LATERAL (
  SELECT make_interval(secs => 0.2 * exp(0.8 * sqrt(-2 * ln(1 - x.u1)) * cos(2 * pi() * x.u2)))
           AS run,
         make_interval(secs => 0.03 * exp(0.6 * sqrt(-2 * ln(1 - x.u2)) * cos(2 * pi() * x.u1)))
           AS wait
) d
CROSS JOIN LATERAL (
  SELECT now() - interval '1 minute'
         - make_interval(secs => {spread} * (1 - x.n::float8 / :count)) AS finished_at
) f
"""
NAIVE = """
SELECT status, count(*) FROM executions
WHERE org_id = :org AND agent_id = :agent AND finished_at >= now() - :window GROUP BY status;
SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (
         ORDER BY extract(epoch FROM finished_at - started_at)),
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (
         ORDER BY extract(epoch FROM started_at - queued_at))
FROM executions
WHERE org_id = :org AND agent_id = :agent AND finished_at >= now() - :window
  AND started_at IS NOT NULL
"""


def timed(call: Callable[[], object]) -> float:
    began = time.perf_counter()
    call()
    return (time.perf_counter() - began) * 1000


def load(count: int) -> float:
    from sqlalchemy import text

    from app.db import db

    began = time.perf_counter()
    with db.begin() as conn:
        # A bench load, not the product's work: past the product's statement timeout.
        conn.execute(text("SET LOCAL statement_timeout = 0"))
        conn.execute(text(LOAD.format(spread=SPREAD_SECONDS)), {"count": count, "agent": AGENT})
    with db.begin() as conn:
        conn.execute(text("ANALYZE executions"))
    return time.perf_counter() - began


def catch_up() -> tuple[float, int]:
    from app.stats import tally

    began = time.perf_counter()
    counted = 0
    while True:
        report = tally.tally(budget_seconds=60.0, lag_seconds=0)
        counted += report.finished
        if report.caught_up:
            return time.perf_counter() - began, counted


def naive(org_id: str, agent_id: str, window: str) -> Callable[[], object]:
    import datetime as dt

    from sqlalchemy import text

    from app.db import db
    from app.stats.services import WINDOWS

    span: dt.timedelta = WINDOWS[window]
    statements = [text(sql) for sql in NAIVE.split(";") if sql.strip()]

    def run() -> None:
        with db.begin() as conn:
            conn.execute(text("SET LOCAL statement_timeout = 0"))
            for statement in statements:
                conn.execute(statement, {"org": org_id, "agent": agent_id, "window": span}).all()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="finished executions")
    parser.add_argument("--calls", type=int, default=20, help="timed calls of each query")
    parser.add_argument("--window", default="7d", choices=["1h", "24h", "7d"])
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database when REDIS_URL")
    args = parser.parse_args(argv)

    cleanups: list[Callable[[], None]] = []
    try:
        database_url = setup_database(cleanups, keep=args.keep, database=DATABASE)
        redis_url = setup_redis(cleanups, args.redis_db)
        os.environ.update({"DATABASE_URL": database_url, "REDIS_URL": redis_url})
        org_id, token = create_org(database_url)

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
        agent_id = created.get_json()["id"]
        for _ in range(3):
            client.post(f"/api/v1/agents/{AGENT}/executions", json={"input": {}}, headers=headers)

        log(f"loading {args.count} finished executions of one agent ...")
        log(f"  loaded in {load(args.count):.1f} s")
        seconds, counted = catch_up()
        log(f"tally caught up: {counted} executions in {seconds:.1f} s")

        url = f"/api/v1/agents/{AGENT}/stats?window={args.window}"

        def stats() -> None:
            response = client.get(url, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"stats answered {response.status_code}: {response.json}")

        stats()
        body = client.get(url, headers=headers).get_json()
        log(f"stats: counts {body['counts']} duration_ms {body['duration_ms']}")
        endpoint = [timed(stats) for _ in range(args.calls)]
        log(
            f"stats endpoint ({args.window}), median of {args.calls}: "
            f"{statistics.median(endpoint):.1f} ms"
        )
        plain = naive(org_id, agent_id, args.window)
        plain()
        raw = [timed(plain) for _ in range(args.calls)]
        log(
            f"naive percentile_cont over raw rows ({args.window}), median of {args.calls}: "
            f"{statistics.median(raw):.1f} ms"
        )
        return 0
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


if __name__ == "__main__":
    sys.exit(main())
