#!/usr/bin/env python
"""Log ingestion: lines a second from one execution into PostgreSQL, stored in order.

    .venv/bin/python bench/logs.py [--count 100000] [--micro-count 100000] [--skip-worker]

Phase 1, the LogBuffer alone (workers/logbuffer.py, as a worker's attempt uses it): an execution
is submitted through `runyard api` and marked claimed (attempt 1) by hand, then --micro-count
lines go through LogBuffer.add with the configured batch (RUNYARD_LOG_BATCH_LINES) and a final
close(). Rate = lines / wall time of those calls (every line is stored when close() returns).

Phase 2, through a real worker: `celery -A workers worker` runs the agent `flood` (this
module's `flood`: ctx.log.info as fast as it can, --count lines). Rate = lines / (first line's
`ts` -> the execution's finished_at): the last line is stored before the outcome is written, so
this is an upper bound on the time the lines took. Both phases then check that the lines read
back with seq 1..N, in order, none missing.

Servers: as bench/throughput.py (a fresh database `runyard_bench_logs`, dropped at the end
unless --keep-db; embedded servers when DATABASE_URL / REDIS_URL are unset).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import (  # noqa: E402
    BIN,
    BenchError,
    Children,
    create_org,
    free_port,
    libpq_url,
    log,
    setup_database,
    setup_redis,
    wait_http,
    wait_until,
    worker_argv,
)

DATABASE = "runyard_bench_logs"
AGENT = "flood"
ENTRYPOINT = "bench.logs:flood"


def flood(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """The agent: logs payload["lines"] lines as fast as it can."""
    info = ctx.log.info
    for number in range(payload["lines"]):
        info(f"line {number} of the flood")
    return {}


class Api:
    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def post(self, path: str, body: dict[str, Any], expect: int) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("POST", path, json.dumps(body).encode(), self.headers)
        response = conn.getresponse()
        answer = response.read()
        conn.close()
        if response.status != expect:
            raise BenchError(f"POST {path} answered {response.status}: {answer[:300]!r}")
        return json.loads(answer)


def check_order(pg, execution_id: str, count: int, first_seq: int = 1) -> None:
    """Every line stored once, seq first_seq.. in order of logging."""
    stored, low, high, out_of_order = pg.execute(
        """
        SELECT count(*), min(seq), max(seq),
               count(*) FILTER (WHERE ts < previous_ts)
        FROM (SELECT seq, ts, lag(ts) OVER (ORDER BY seq) AS previous_ts
              FROM execution_logs WHERE execution_id = %s) lines
        """,
        (execution_id,),
    ).fetchone()
    last = first_seq + count - 1
    if (stored, low, high, out_of_order) != (count, first_seq, last, 0):
        raise BenchError(
            f"lines read back: {stored} stored, seq {low}..{high}, {out_of_order} out of order; "
            f"expected {count}, seq {first_seq}..{last}, 0"
        )
    log(f"  read back: {stored} lines, seq {low}..{high}, in order")


def micro(args, database_url: str, api: Api, pg) -> None:
    from app.config import current_config
    from app.db import db
    from app.executions.spec import LEVELS
    from workers.attempt import AttemptDatabase
    from workers.logbuffer import LogBuffer

    execution = api.post(f"/api/v1/agents/{AGENT}/executions", {"input": {"lines": 1}}, 202)
    # Claimed by hand, as the worker's claim would (no worker runs in this phase).
    pg.execute(
        "UPDATE executions SET status = 'running', attempt = 1 WHERE id = %s", (execution["id"],)
    )
    cfg = current_config()
    db.configure(database_url)
    try:
        with db.hot() as conn:
            buffer = LogBuffer(
                AttemptDatabase(conn),
                execution["id"],
                1,
                0,
                batch_lines=cfg.log_batch_lines,
                flush_seconds=cfg.log_flush_seconds,
                max_chars=cfg.log_line_max_chars,
                max_lines=args.micro_count,
            )
            info = LEVELS["info"]
            started = time.perf_counter()
            for number in range(args.micro_count):
                buffer.add(info, f"line {number} of the flood")
            buffer.close()
            seconds = time.perf_counter() - started
    finally:
        db.dispose()
    log(
        f"LogBuffer alone: {args.micro_count} lines in {seconds:.2f}s = "
        f"{args.micro_count / seconds:,.0f} lines/s (batch {cfg.log_batch_lines})"
    )
    check_order(pg, execution["id"], args.micro_count)


def through_worker(args, children: Children, env: dict[str, str], api: Api, pg) -> None:
    children.start("logs-worker", worker_argv("workers", 1, "bench-logs"), env)
    execution = api.post(
        f"/api/v1/agents/{AGENT}/executions", {"input": {"lines": args.count}}, 202
    )
    status_sql = "SELECT status, error FROM executions WHERE id = %s"

    def finished() -> bool:
        status, error = pg.execute(status_sql, (execution["id"],)).fetchone()
        if status not in ("queued", "running", "succeeded"):
            raise BenchError(f"the flood execution ended {status}: {error}")
        return status == "succeeded"

    wait_until(
        finished,
        time.monotonic() + args.timeout,
        "the flood execution",
        lambda: children.check("logs-worker"),
    )
    seconds = pg.execute(
        """
        SELECT extract(epoch FROM e.finished_at - (SELECT min(ts) FROM execution_logs
                                                   WHERE execution_id = e.id))::float8
        FROM executions e WHERE e.id = %s
        """,
        (execution["id"],),
    ).fetchone()[0]
    log(
        f"through a worker: {args.count} lines in {seconds:.2f}s (first line logged -> "
        f"execution finished) = {args.count / seconds:,.0f} lines/s"
    )
    check_order(pg, execution["id"], args.count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="lines of the worker phase")
    parser.add_argument(
        "--micro-count", type=int, default=100_000, help="lines of the LogBuffer phase"
    )
    parser.add_argument("--skip-worker", action="store_true", help="the LogBuffer phase only")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--redis-db", type=int, default=13)
    parser.add_argument("--keep-db", action="store_true")
    args = parser.parse_args(argv)

    import psycopg
    from sqlalchemy.engine import make_url

    cleanups: list = []
    children = Children()
    try:
        database_url = setup_database(cleanups, args.keep_db, DATABASE)
        redis_url = setup_redis(cleanups, args.redis_db)
        _org_id, token = create_org(database_url)
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "RUNYARD_AGENT_MODULES": "runyard_examples,bench",
            # The worker imports the agent from this repository's bench package.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        port = free_port()
        children.start("logs-api", [BIN / "runyard", "api", "--port", str(port)], env)
        wait_http(children, "logs-api", f"http://127.0.0.1:{port}/healthz", timeout=30)
        api = Api(port, token)
        most = max(args.count, args.micro_count)
        api.post(
            "/api/v1/agents",
            {
                "name": AGENT,
                "runtime": {"type": "python", "entrypoint": ENTRYPOINT},
                "limits": {"max_log_lines": most},
                "timeout_seconds": int(args.timeout),
            },
            201,
        )
        with psycopg.connect(libpq_url(make_url(database_url)), autocommit=True) as pg:
            if args.micro_count:
                micro(args, database_url, api, pg)
            if not args.skip_worker:
                through_worker(args, children, env, api, pg)
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        children.stop_all()
        for cleanup in reversed(cleanups):
            cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
