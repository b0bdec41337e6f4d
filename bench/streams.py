"""Submit latency of a default `runyard api` with and without open event streams.

Starts `runyard api` with its defaults (2 processes; RUNYARD_API_THREADS request threads plus
RUNYARD_MAX_STREAMS_PER_PROCESS stream threads each) and one worker, then measures the median
(and p95) latency of --count sequential submits (POST /api/v1/agents/noop/executions, one
keep-alive connection) with no stream open, opens --streams event streams
(GET /api/v1/executions/{id}/events) on executions that stay queued (their agent's queue has no
worker), checks each got its first `status` event, measures the submits again while they stay
open, and prints both medians and the rise in %.

A stream refused with 503 (its process already serves RUNYARD_MAX_STREAMS_PER_PROCESS: gunicorn
hands connections to whichever process accepts first) is retried after a short pause, and the
retries are counted.

Servers as bench/throughput.py (whose helpers this reuses): DATABASE_URL set -> a fresh
database `runyard_bench_streams` on that server; unset -> embedded PostgreSQL. REDIS_URL set ->
a free database on it; unset -> embedded Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import (  # noqa: E402 - after the path fix above
    BIN,
    ENTRYPOINT,
    LOG_DIR,
    BenchError,
    Children,
    create_org,
    free_port,
    log,
    setup_database,
    setup_redis,
    wait_http,
    worker_argv,
)

DATABASE = "runyard_bench_streams"
PARKED_QUEUE = "nobody-serves-this"


class Api:
    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        payload = json.dumps(body).encode() if body is not None else None
        for attempt in range(2):
            try:
                self.conn.request(method, path, payload, self.headers)
                response = self.conn.getresponse()
                return response.status, json.loads(response.read() or b"null")
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # An idle keep-alive connection the server closed: once more on a fresh one.
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def submit_latencies(api: Api, count: int) -> list[float]:
    """Seconds per sequential submit of the noop agent."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        status, body = api.call("POST", "/api/v1/agents/noop/executions", {"input": {}})
        latencies.append(time.perf_counter() - started)
        if status != 202:
            raise BenchError(f"a submit answered {status}: {body}")
    return latencies


class OpenStream(threading.Thread):
    """One event stream, read line by line until closed; `ready` once its status event came."""

    def __init__(self, port: int, token: str, execution_id: str) -> None:
        super().__init__(daemon=True)
        self.port, self.token, self.execution_id = port, token, execution_id
        self.ready = threading.Event()
        self.retries = 0
        self.error: str | None = None
        self.conn: http.client.HTTPConnection | None = None

    def run(self) -> None:
        try:
            response = self._open()
            while line := response.readline():
                if line.startswith(b"event: status"):
                    self.ready.set()
        except (OSError, http.client.HTTPException) as exc:
            if not self.ready.is_set():
                self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ready.set()

    def _open(self) -> http.client.HTTPResponse:
        path = f"/api/v1/executions/{self.execution_id}/events"
        while True:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            self.conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
            response = self.conn.getresponse()
            if response.status == 200:
                return response
            body = response.read()
            self.conn.close()
            if response.status != 503 or self.retries >= 50:
                raise OSError(f"the stream answered {response.status}: {body[:200]!r}")
            self.retries += 1
            time.sleep(0.1)

    def close(self) -> None:
        # shutdown, not close(): closing the reader another thread blocks in would wait for
        # that read (up to a keepalive) on the reader's lock; a shutdown ends the read at once.
        sock = self.conn.sock if self.conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def summary(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.95) - 1] * 1000


def measure(args, children: Children, env: dict[str, str], database_url: str) -> None:
    _, token = create_org(database_url)
    port = free_port()
    children.start("api", [BIN / "runyard", "api", "--port", str(port)], env)
    wait_http(children, "api", f"http://127.0.0.1:{port}/healthz", timeout=30)
    children.start("worker", worker_argv("workers", 1, "bench-streams"), env)
    api = Api(port, token)
    for definition in (
        {"name": "noop", "runtime": {"type": "python", "entrypoint": ENTRYPOINT}},
        {
            "name": "parked",
            "runtime": {"type": "python", "entrypoint": ENTRYPOINT},
            "queue": PARKED_QUEUE,
        },
    ):
        status, body = api.call("POST", "/api/v1/agents", definition)
        if status != 201:
            raise BenchError(f"creating an agent answered {status}: {body}")

    submit_latencies(api, args.warmup)
    quiet = submit_latencies(api, args.count)
    children.check("api")

    streams: list[OpenStream] = []
    if args.streams:
        status, body = api.call(
            "POST",
            "/api/v1/agents/parked/executions/batch",
            {"items": [{"input": {}}] * args.streams},
        )
        if status != 202:
            raise BenchError(f"the batch of parked executions answered {status}: {body}")
        streams = [OpenStream(port, token, execution_id) for execution_id in body["ids"]]
    try:
        opened_at = time.monotonic()
        for stream in streams:
            stream.start()
        for stream in streams:
            stream.ready.wait(timeout=max(1.0, 60 - (time.monotonic() - opened_at)))
        failed = [s.error or "no status event" for s in streams if s.error or not s.ready.is_set()]
        if failed:
            raise BenchError(f"{len(failed)} stream(s) did not open: {failed[:3]}")
        log(
            f"  {len(streams)} streams open in {time.monotonic() - opened_at:.1f} s "
            f"({sum(s.retries for s in streams)} retries after a 503)"
        )
        busy = submit_latencies(api, args.count)
        still_open = sum(stream.is_alive() for stream in streams)
        children.check("api")
    finally:
        for stream in streams:
            stream.close()

    quiet_median, quiet_p95 = summary(quiet)
    busy_median, busy_p95 = summary(busy)
    log("")
    log(f"submit, 0 streams:   median {quiet_median:.2f} ms, p95 {quiet_p95:.2f} ms")
    log(
        f"submit, {len(streams)} streams: median {busy_median:.2f} ms, p95 {busy_p95:.2f} ms "
        f"({still_open} streams still open at the end)"
    )
    log(f"rise of the median: {(busy_median / quiet_median - 1) * 100:+.1f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="sequential submits per phase")
    parser.add_argument("--streams", type=int, default=200, help="event streams held open")
    parser.add_argument("--warmup", type=int, default=30, help="uncounted submits first")
    parser.add_argument("--redis-db", type=int, default=12, help="Redis database when REDIS_URL")
    parser.add_argument("--keep-db", action="store_true", help=f"leave the {DATABASE} database")
    args = parser.parse_args(argv)
    if args.count < 2 or args.streams < 0:
        parser.error("--count must be at least 2 and --streams not negative")

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    cleanups: list[Callable[[], None]] = []
    children = Children()
    status = 0
    try:
        log(
            f"streams: {args.count} sequential submits with 0 and {args.streams} open event "
            f"streams on a default `runyard api`; logs in {LOG_DIR}"
        )
        database_url = setup_database(cleanups, args.keep_db, DATABASE)
        redis_url = setup_redis(cleanups, args.redis_db)
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        # The defaults under test: nothing inherited may change the API's threads or caps.
        for name in (
            "RUNYARD_API_WORKERS",
            "RUNYARD_API_THREADS",
            "RUNYARD_MAX_STREAMS_PER_PROCESS",
            "RUNYARD_BROKER_URL",
            "RUNYARD_RESULT_BACKEND",
        ):
            env.pop(name, None)
        measure(args, children, env, database_url)
    except KeyboardInterrupt:
        log("\ninterrupted")
        status = 130
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
