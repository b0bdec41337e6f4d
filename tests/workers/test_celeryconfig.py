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


def test_beat_reads_schedules_from_postgresql_and_keeps_the_sweeper():
    from celery.utils.imports import symbol_by_name

    from workers.scheduler import DatabaseScheduler

    assert symbol_by_name(app.conf.beat_scheduler) is DatabaseScheduler
    assert app.conf.beat_schedule["runyard-sweep"]["task"] == "runyard.sweep"
