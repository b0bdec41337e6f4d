"""bench/fairness.py's agent, and its plain Celery baseline: both sleep ~10 ms.

`sleep_agent` is the Runyard `python` agent (`bench.plain_fairness:sleep_agent`, with
RUNYARD_AGENT_MODULES naming this module). `stamped_sleep` is the plain Celery task: it is
handed the client's clock at apply_async and returns it with its own clock at its start, so the
client can tell a task's queue wait from its stored result.

`celery -A bench.plain_fairness worker ...` (from the repository root): the app is
bench/plain_celery.py's, whose settings mirror celeryconfig.py where they shape the cost of a
message; every result goes to the Redis result backend.
"""

from __future__ import annotations

import time

from bench.plain_celery import app


@app.task(name="bench.stamped_sleep")
def stamped_sleep(milliseconds: int, submitted: float) -> dict:
    started = time.time()
    time.sleep(milliseconds / 1000)
    return {"submitted": submitted, "started": started}


def sleep_agent(payload: dict, ctx) -> dict:
    """The Runyard agent: sleeps ctx.config["sleep_ms"] (10 by default), returns nothing."""
    time.sleep(ctx.config.get("sleep_ms", 10) / 1000)
    return {}
