#!/usr/bin/env python
"""Latency of one trivial child-process execution, submit to finish, against plain Celery.

    .venv/bin/python bench/overhead.py [--count 100] [--warmup 10]

One execution at a time (so nothing queues), each of:
- `script`: `def main(input, ctx): return input`;
- `command`: this interpreter (`python -c`, by absolute path) reading the input on stdin and
  writing it to $RUNYARD_OUTPUT_PATH;
- plain Celery: a task that runs the same program with subprocess.run (input on stdin, output on
  stdout) and returns.
Latency = from just before the client's POST (or apply_async) to the stored end: the execution's
`finished_at` in PostgreSQL, or the time the plain task returned. It also prints the runtime's own
wall time (`resource_usage.wall_ms`: the child from spawn to reap) to show where the rest goes.

Servers as bench/throughput.py (DATABASE_URL / REDIS_URL or embedded ones, a fresh database).
"""

from __future__ import annotations

import argparse
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
    LOG_DIR,
    BenchError,
    Children,
    create_org,
    flushdb,
    free_port,
    libpq_url,
    log,
    setup_database,
    setup_redis,
    wait_http,
    worker_argv,
)

PROGRAM = (
    "import json, os, sys\n"
    "data = json.load(sys.stdin)\n"
    "path = os.environ.get('RUNYARD_OUTPUT_PATH')\n"
    "json.dump(data, open(path, 'w') if path else sys.stdout)\n"
)
AGENTS = {
    "trivial-script": {
        "type": "script",
        "language": "python",
        "source": "def main(input, ctx):\n    return input\n",
    },
    # The interpreter by absolute path: a shim on PATH (pyenv's) would add its own startup to
    # both sides and blur the comparison.
    "trivial-command": {"type": "command", "argv": [sys.executable, "-c", PROGRAM]},
}


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"median {statistics.median(ordered):7.1f} ms   p95 {p95:7.1f} ms"


class Api:
    def __init__(self, port: int, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        payload = None if body is None else json.dumps(body).encode()
        self.conn.request(method, path, payload, self.headers)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read() or b"null")


def phase_runyard(args, children: Children, env: dict[str, str], database_url: str) -> dict:
    import psycopg
    from sqlalchemy.engine import make_url

    _, token = create_org(database_url)
    port = free_port()
    children.start("api", [BIN / "runyard", "api", "--port", str(port)], env)
    wait_http(children, "api", f"http://127.0.0.1:{port}/healthz", timeout=30)
    children.start("runyard-worker", worker_argv("workers", 2, "bench-overhead"), env)
    api = Api(port, token)
    for name, runtime in AGENTS.items():
        status, body = api.call("POST", "/api/v1/agents", {"name": name, "runtime": runtime})
        if status != 201:
            raise BenchError(f"creating {name} answered {status}: {body}")
    poll = psycopg.connect(libpq_url(make_url(database_url)), autocommit=True)
    results = {}
    try:
        for name in AGENTS:
            latencies, runtime_ms = [], []
            for number in range(args.warmup + args.count):
                started = time.time()
                status, body = api.call(
                    "POST", f"/api/v1/agents/{name}/executions", {"input": {"n": number}}
                )
                if status != 202:
                    raise BenchError(f"submit answered {status}: {body}")
                deadline = time.monotonic() + 30
                while True:
                    row = poll.execute(
                        "SELECT status, extract(epoch FROM finished_at)::float8, resource_usage "
                        "FROM executions WHERE id = %s",
                        (body["id"],),
                    ).fetchone()
                    if row[0] not in ("queued", "running"):
                        break
                    children.check("runyard-worker")
                    if time.monotonic() > deadline:
                        raise BenchError(f"{name} execution {body['id']} still {row[0]}")
                    time.sleep(0.002)
                if row[0] != "succeeded":
                    raise BenchError(f"{name} execution {body['id']} ended {row[0]}")
                if number >= args.warmup:
                    latencies.append((row[1] - started) * 1000)
                    runtime_ms.append(row[2]["wall_ms"])
            results[name] = (latencies, runtime_ms)
    finally:
        poll.close()
    return results


def phase_plain(args, children: Children, env: dict[str, str]) -> list[float]:
    from bench.plain_celery import app, spawn

    children.start("plain-worker", worker_argv("bench.plain_celery", 2, "bench-plain"), env)
    time.sleep(2)
    latencies = []
    for number in range(args.warmup + args.count):
        started = time.time()
        result = spawn.apply_async(args=[[sys.executable, "-c", PROGRAM], {"n": number}])
        ended = result.get(timeout=30)["ended"]
        if number >= args.warmup:
            latencies.append((ended - started) * 1000)
    app.close()
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="measured executions per kind")
    parser.add_argument("--warmup", type=int, default=10, help="uncounted executions first")
    parser.add_argument("--redis-db", type=int, default=11, help="Redis database when REDIS_URL")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    cleanups: list[Callable[[], None]] = []
    children = Children()
    status = 0
    try:
        log(f"overhead: {args.count} sequential executions per kind; logs in {LOG_DIR}")
        database_url = setup_database(cleanups, keep=False)
        redis_url = setup_redis(cleanups, args.redis_db)
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "RUNYARD_ALLOWED_COMMANDS": sys.executable,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        for name in ("RUNYARD_BROKER_URL", "RUNYARD_RESULT_BACKEND"):
            env.pop(name, None)
        os.environ.update({"REDIS_URL": redis_url, "RUNYARD_ALLOWED_COMMANDS": sys.executable})
        flushdb(redis_url)
        try:
            runyard = phase_runyard(args, children, env, database_url)
        finally:
            children.stop("runyard-worker")
            children.stop("api")
        flushdb(redis_url)
        try:
            plain = phase_plain(args, children, env)
        finally:
            children.stop("plain-worker")
        log("")
        log("submit -> finished, one at a time:")
        for name, (latencies, runtime_ms) in runyard.items():
            log(f"  {name:16} {percentiles(latencies)}")
            log(f"  {'':16} {percentiles(runtime_ms)}   (of which the child, spawn to reap)")
        log(f"  {'plain celery':16} {percentiles(plain)}   (task running the same program)")
        plain_median = statistics.median(plain)
        for name, (latencies, _) in runyard.items():
            log(
                f"  {name}: {statistics.median(latencies) - plain_median:+.1f} ms median "
                "over plain Celery"
            )
    except BenchError as exc:
        log(f"FAILED: {exc}")
        status = 1
    finally:
        children.stop_all()
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception as exc:  # keep cleaning up
                log(f"cleanup: {exc!r}")
    return status


if __name__ == "__main__":
    sys.exit(main())
