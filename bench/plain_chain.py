"""bench/chain.py's two sides of one step: the `python` agent Runyard runs, and the plain Celery
task the baseline chains. Both sleep as long.

`celery -A bench.plain_chain worker ...` (from the repository root). The settings mirror
celeryconfig.py where they shape the cost of a message (JSON, acks_late, reject on worker lost,
prefetch 1, the Redis transport options); like any plain Celery chain, each task stores its
result in the Redis result backend.
"""

from __future__ import annotations

import os
import time

from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
VISIBILITY_TIMEOUT = 86400 + 3600

app = Celery("plain_chain", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    event_serializer="json",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue="default",
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "priority_steps": list(range(10)),
        "sep": ":",
        "queue_order_strategy": "priority",
    },
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    worker_hijack_root_logger=False,
)


@app.task(name="bench.sleep")
def sleep_task(milliseconds: int) -> dict:
    time.sleep(milliseconds / 1000)
    return {}


def sleep_step(payload: dict, ctx) -> dict:
    """The Runyard agent: sleeps ctx.config["sleep_ms"] and passes its input on."""
    time.sleep(ctx.config.get("sleep_ms", 10) / 1000)
    return payload


@app.task(name="bench.gather")
def gather(results: list) -> int:
    """bench/durable.py's chord callback: what the fan-out's parent does with its children."""
    return len(results)


def fan_out(payload: dict, ctx) -> dict:
    """The Runyard parent of bench/durable.py: starts `count` children and waits for them all."""
    ids = [ctx.start(payload["child"], {"n": n}) for n in range(payload["count"])]
    return {"gathered": len(ctx.wait(ids))}


def resumes_on_event(payload: dict, ctx) -> dict:
    """bench/durable.py's event waiter: logs the moment it runs again after the event."""
    data = ctx.wait_for_event(payload["event"], match={"key": payload["key"]})
    ctx.log.info("resumed")
    return {"data": data}
