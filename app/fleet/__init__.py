"""The worker fleet as Celery's remote control sees it: GET /api/v1/workers."""
