"""Plain Celery, the baseline of bench/throughput.py: a no-op task on the same broker settings.

`celery -A bench.plain_celery worker ...` (from the repository root). The broker is
BENCH_BROKER_URL when set (bench/throughput.py --broker-url: RabbitMQ, with Celery's defaults
there: no priorities, no publisher confirms), else REDIS_URL; the result backend is REDIS_URL.
The settings mirror celeryconfig.py where they shape the cost of a message (JSON, acks_late,
reject on worker lost, prefetch 1, the Redis transport options) but, unlike Runyard, store every
result in the Redis result backend: that is how plain Celery hands a result back, and the
benchmark waits for it.
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13")
# Same visibility timeout as celeryconfig.py with the default RUNYARD_MAX_TIMEOUT_SECONDS.
VISIBILITY_TIMEOUT = 86400 + 3600

app = Celery("plain", broker=os.environ.get("BENCH_BROKER_URL") or REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    event_serializer="json",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue="default",
    task_ignore_result=False,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "priority_steps": list(range(10)),
        "sep": ":",
        "queue_order_strategy": "priority",
        "socket_connect_timeout": 4,
        "socket_timeout": 30,
    },
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop(payload: dict) -> dict:
    return {}


@app.task(name="bench.spawn")
def spawn(argv: list[str], payload: dict) -> dict:
    """What a trivial `command` execution does, as plain Celery would: run the program with the
    input on stdin and take its JSON output; returns when it ended (for bench/overhead.py)."""
    import json
    import subprocess
    import time

    done = subprocess.run(argv, input=json.dumps(payload).encode(), capture_output=True, check=True)
    return {"output": json.loads(done.stdout), "ended": time.time()}
