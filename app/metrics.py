"""Prometheus metrics, served at /metrics: HTTP metrics and quota refusals of the API processes
(summed over gunicorn's workers in multiprocess mode), and the executions', queues' and
schedules' metrics read from PostgreSQL (app/stats/collector.py), the same from every process."""

from __future__ import annotations

import os
import time

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from app.stats.collector import DatabaseCollector

REQUESTS = Counter(
    "runyard_http_requests_total", "HTTP requests answered", ["method", "endpoint", "status"]
)
LATENCY = Histogram("runyard_http_request_seconds", "HTTP request latency", ["endpoint"])
# Refused submits store nothing, so they are counted where they happen: in the API processes.
QUOTA_REJECTIONS = Counter(
    "runyard_quota_rejections_total", "Submits refused by a quota (429)", ["org", "limit"]
)
DATABASE = DatabaseCollector()


def install(app: Flask) -> None:
    @app.get("/metrics")
    def metrics():
        database = CollectorRegistry(auto_describe=False)
        database.register(DATABASE)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Under `runyard api`: the sum over every gunicorn worker.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            own = generate_latest(registry)
        else:
            own = generate_latest()
        return Response(own + generate_latest(database), mimetype=CONTENT_TYPE_LATEST)

    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def count(response):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        REQUESTS.labels(request.method, endpoint, response.status_code).inc()
        # Set by the error handler that answered a quota's 429 (app/http.py).
        if "quota_refused" in g and "principal" in g:
            QUOTA_REJECTIONS.labels(g.principal.org_name, g.quota_refused).inc()
        if "started" in g:
            LATENCY.labels(endpoint).observe(time.perf_counter() - g.started)
        return response
