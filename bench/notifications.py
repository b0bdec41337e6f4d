#!/usr/bin/env python
"""How fast notification events are delivered: events per second through workers/notify.py.

    .venv/bin/python bench/notifications.py [--count 1000] [--concurrency 8]

One subscription (created through the API) points at a local receiver on 127.0.0.2 that
answers 204 at once; `--count` events are written to its outbox in one statement, then the
delivery runs beat's job (workers.notify.deliver_due: claim a batch with SKIP LOCKED, build and
sign each body, POST them `--concurrency` at a time, record the outcomes) until none is left.
Prints the events per second and checks every event was received once and marked delivered.

Servers as bench/throughput.py (DATABASE_URL / REDIS_URL or embedded ones), in a fresh
database of its own (runyard_bench_notify).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import create_org, log, setup_database, setup_redis  # noqa: E402

RECEIVER_HOST = "127.0.0.2"


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops the SYNs of concurrent deliveries, and each
    # dropped one costs the sender a 1 s retransmit: the figure would measure the receiver.
    request_queue_size = 128


class Receiver:
    """Answers 204 to every POST and counts the event ids it saw."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        lock = threading.Lock()
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    seen.append(self.headers["Runyard-Event-Id"])
                self.send_response(204)
                self.end_headers()

        self._httpd = _Server((RECEIVER_HOST, 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://{RECEIVER_HOST}:{self._httpd.server_address[1]}/hook"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="events to deliver")
    parser.add_argument("--concurrency", type=int, default=8, help="RUNYARD_NOTIFY_CONCURRENCY")
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database when REDIS_URL")
    args = parser.parse_args(argv)

    cleanups: list[Callable[[], None]] = []
    try:
        database_url = setup_database(cleanups, keep=False, database="runyard_bench_notify")
        redis_url = setup_redis(cleanups, args.redis_db)
        os.environ.update(
            {
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_url,
                "RUNYARD_HTTP_ALLOW_HOSTS": RECEIVER_HOST,
                "RUNYARD_NOTIFY_CONCURRENCY": str(args.concurrency),
            }
        )
        org_id, token = create_org(database_url)
        receiver = Receiver()
        cleanups.append(receiver.stop)

        from sqlalchemy import text

        from app import create_app
        from app.config import Config
        from app.db import db
        from workers import notify

        cleanups.append(db.dispose)
        client = create_app(Config.from_env()).test_client()
        created = client.post(
            "/api/v1/notifications",
            json={"name": "bench", "url": receiver.url, "events": ["quota.exceeded"]},
            headers={"Authorization": f"Bearer {token}"},
        )
        if created.status_code != 201:
            log(f"creating the notification failed: {created.get_json()}")
            return 1
        with db.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO notification_events (org_id, notification_id, type, data) "
                    "SELECT :org, :n, 'quota.exceeded', "
                    "jsonb_build_object('limit', 'submit_rate', 'n', i) "
                    "FROM generate_series(1, :count) i"
                ),
                {"org": org_id, "n": created.get_json()["id"], "count": args.count},
            )
        began = time.perf_counter()
        while notify.deliver_due():
            pass
        elapsed = time.perf_counter() - began
        with db.engine.connect() as conn:
            delivered = conn.execute(
                text("SELECT count(*) FROM notification_events WHERE status = 'delivered'")
            ).scalar()
        log(
            f"{args.count} events, concurrency {args.concurrency}: {elapsed:.2f} s, "
            f"{args.count / elapsed:.0f} events/s; received {len(receiver.seen)} "
            f"({len(set(receiver.seen))} distinct), marked delivered {delivered}"
        )
        return 0 if delivered == args.count == len(set(receiver.seen)) else 1
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


if __name__ == "__main__":
    sys.exit(main())
