"""bench/fairness.py's agent, and its plain Celery baseline: both sleep ~10 ms.

`sleep_agent` is the Runyard `python` agent (`bench.plain_fairness:sleep_agent`, with
RUNYARD_AGENT_MODULES naming this module). `stamped_sleep` is the plain Celery task: it is
handed the client's clock at apply_async and returns it with its own clock at its start, so the
client can tell a task's queue wait from its stored result.

`celery -A bench.plain_fairness worker ...` (from the repository root). The settings mirror
celeryconfig.py where they shape the cost of a message (JSON, acks_late, reject on worker lost,
prefetch 1, the Redis transport options); every result goes to the Redis result backend.
"""

from __future__ import annotations

import os
import time

from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13")
# Same visibility timeout as celeryconfig.py with the default RUNYARD_MAX_TIMEOUT_SECONDS.
VISIBILITY_TIMEOUT = 86400 + 3600

app = Celery("plain_fairness", broker=REDIS_URL, backend=REDIS_URL)
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


@app.task(name="bench.stamped_sleep")
def stamped_sleep(milliseconds: int, submitted: float) -> dict:
    started = time.time()
    time.sleep(milliseconds / 1000)
    return {"submitted": submitted, "started": started}


def sleep_agent(payload: dict, ctx) -> dict:
    """The Runyard agent: sleeps ctx.config["sleep_ms"] (10 by default), returns nothing."""
    time.sleep(ctx.config.get("sleep_ms", 10) / 1000)
    return {}
