#!/usr/bin/env python
"""What the console's pages cost with many executions in the organization.

    .venv/bin/python bench/console.py [--count 100000] [--calls 10]

Loads `--count` finished executions of one agent into a fresh database (bench/stats.py's load:
one INSERT ... SELECT generate_series), runs the stats tally until it has caught up, signs in to
the console through the WSGI app (no HTTP server), then prints the median time of `--calls`
requests of each page: the overview, the executions list (first page, a status filter, page 100),
an execution's page and its live fragment, the agent's page (statistics from the rollups).

Servers as bench/throughput.py (DATABASE_URL / REDIS_URL or embedded ones, a fresh database).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.stats import catch_up, load, timed  # noqa: E402 - after the sys.path fix above
from bench.throughput import (  # noqa: E402
    AGENT,
    ENTRYPOINT,
    create_org,
    log,
    setup_database,
    setup_redis,
)

DATABASE = "runyard_bench_console"


def sign_in(client, token: str) -> None:
    form = client.get("/ui/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    answer = client.post("/ui/login", data={"token": token, "csrf_token": csrf})
    if answer.status_code != 302:
        raise RuntimeError(f"sign-in answered {answer.status_code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="finished executions")
    parser.add_argument("--calls", type=int, default=10, help="timed requests of each page")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database when REDIS_URL")
    args = parser.parse_args(argv)

    cleanups: list[Callable[[], None]] = []
    try:
        database_url = setup_database(cleanups, keep=args.keep, database=DATABASE)
        redis_url = setup_redis(cleanups, args.redis_db)
        os.environ.update({"DATABASE_URL": database_url, "REDIS_URL": redis_url})
        _, token = create_org(database_url)

        from app import create_app
        from app.config import Config
        from app.db import db

        cleanups.append(db.dispose)
        client = create_app(Config.from_env()).test_client()
        agent = {"name": AGENT, "runtime": {"type": "python", "entrypoint": ENTRYPOINT}}
        created = client.post(
            "/api/v1/agents", json=agent, headers={"Authorization": f"Bearer {token}"}
        )
        if created.status_code != 201:
            log(f"creating the agent failed: {created.get_json()}")
            return 1
        log(f"loading {args.count} finished executions of one agent ...")
        log(f"  loaded in {load(args.count):.1f} s")
        seconds, counted = catch_up()
        log(f"tally caught up: {counted} executions in {seconds:.1f} s")

        sign_in(client, token)
        listed = client.get("/ui/executions").get_data(as_text=True)
        execution_id = re.search(r'/ui/executions/([0-9a-f-]{36})"', listed).group(1)
        pages = {
            "overview": "/ui/",
            "executions, page 1": "/ui/executions",
            "executions, status=failed": "/ui/executions?status=failed",
            "executions, page 100": "/ui/executions?page=100",
            "execution": f"/ui/executions/{execution_id}",
            "execution live fragment": f"/ui/executions/{execution_id}/live",
            "agent (stats 24h)": f"/ui/agents/{AGENT}",
        }
        for name, path in pages.items():

            def get(path: str = path) -> None:
                answer = client.get(path)
                if answer.status_code != 200:
                    raise RuntimeError(f"{path} answered {answer.status_code}")

            get()
            times = [timed(get) for _ in range(args.calls)]
            log(f"{name:<28} median of {args.calls}: {statistics.median(times):7.1f} ms")
        return 0
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


if __name__ == "__main__":
    sys.exit(main())
