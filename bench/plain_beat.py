"""Plain celery beat, the baseline of bench/schedules.py: N crontab entries in `beat_schedule`,
each publishing a plain task to the queue `plain-beat` (which no worker serves).

`celery -A bench.plain_beat beat` with BENCH_SCHEDULES=N and REDIS_URL set. The broker settings
mirror celeryconfig.py where they shape the cost of a message (JSON, the Redis transport options).
"""

from __future__ import annotations

import os

from celery import Celery
from celery.schedules import crontab

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13")
QUEUE = "plain-beat"
COUNT = int(os.environ.get("BENCH_SCHEDULES", "10000"))

app = Celery("plain-beat", broker=REDIS_URL)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "priority_steps": list(range(10)),
        "sep": ":",
        "queue_order_strategy": "priority",
    },
    beat_schedule={
        f"plain-{i}": {
            "task": "bench.noop",
            "schedule": crontab(minute="*"),
            "args": [{"n": i}],
            "options": {"queue": QUEUE},
        }
        for i in range(COUNT)
    },
)
