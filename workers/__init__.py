"""The Celery app (`celery -A workers worker|beat|flower`).

Importing this module is cheap (the API imports it to publish); the tasks, runtimes and their
dependencies load only in workers, through `include`.
"""

from celery import Celery

app = Celery("runyard", include=["workers.tasks", "workers.chains"])
app.config_from_object("celeryconfig")

__all__ = ["app"]
