"""The Celery settings ARCHITECTURE.md fixes."""

from app.config import current_config
from workers import app


def test_settings_that_are_not_up_for_debate():
    conf = app.conf
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    longest_timeout = current_config().max_timeout_seconds
    assert conf.broker_transport_options["visibility_timeout"] > longest_timeout


def test_beat_reads_schedules_from_postgresql_and_runs_maintenance_itself():
    from celery.utils.imports import symbol_by_name

    from workers.scheduler import DatabaseScheduler

    assert symbol_by_name(app.conf.beat_scheduler) is DatabaseScheduler
    # No maintenance task waits in a worker queue (tests/workers/test_sweeper.py runs beat's own).
    assert app.conf.beat_schedule == {}


def test_the_agent_schema_allows_no_timeout_above_the_visibility_timeout():
    import json
    from pathlib import Path

    schema = json.loads((Path(__file__).parents[2] / "schemas" / "agent.json").read_text())
    allowed = schema["properties"]["timeout_seconds"]["maximum"]
    assert allowed <= current_config().max_timeout_seconds
    assert app.conf.broker_transport_options["visibility_timeout"] > allowed


def test_a_running_worker_uses_these_settings(worker):
    """What a live worker reports over the broker, not only what this process imported."""
    replies = app.control.inspect(timeout=5).conf(with_defaults=True) or {}
    worker_conf = next(conf for name, conf in replies.items() if name.startswith("test-"))
    assert worker_conf["task_acks_late"] is True
    assert worker_conf["task_reject_on_worker_lost"] is True
    assert worker_conf["worker_prefetch_multiplier"] == 1
    assert worker_conf["accept_content"] == ["json"]
    assert worker_conf["task_serializer"] == "json"
    assert worker_conf["result_serializer"] == "json"
    visibility = worker_conf["broker_transport_options"]["visibility_timeout"]
    assert visibility > current_config().max_timeout_seconds
