"""The Celery app (`celery -A workers worker|beat|flower`), defined in app/broker: the one
package that speaks Celery for the API too.

Importing this module is cheap (no database, no Flask); the tasks, runtimes and their
dependencies load only in workers, through the app's `include`.
"""

from app.broker import celery_app as app

__all__ = ["app"]
