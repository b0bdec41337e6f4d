"""Celery settings (plain lowercase names), from the one configuration module.

The settings ARCHITECTURE.md fixes are here and asserted by tests/workers/test_celeryconfig.py.
"""

from app.config import current_config
from app.hardening import make_undumpable

# Worker, beat and flower all load this module: none may be readable by an agent's process.
make_undumpable()

_cfg = current_config()

broker_url = _cfg.broker_url
if broker_url.startswith("redis://"):
    broker_transport = "workers.redis_transport:Transport"
# Canvas bookkeeping only: results that matter live in PostgreSQL.
result_backend = _cfg.result_backend
result_expires = 3600

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

# A message is acknowledged after its task ran, and given back if the pool process dies.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

task_default_queue = "default"
task_create_missing_queues = True
task_ignore_result = True
task_track_started = False

broker_connection_retry_on_startup = True
broker_connection_timeout = 4
broker_transport_options = {
    # Above the longest agent timeout, or Redis would hand a long execution to a second worker
    # while the first still runs it. Lost work is recovered sooner by the sweeper's leases.
    "visibility_timeout": _cfg.max_timeout_seconds + 3600,
    "priority_steps": list(range(10)),
    "sep": ":",
    "queue_order_strategy": "priority",
    "socket_connect_timeout": 4,
    "socket_timeout": 30,
}
result_backend_transport_options = {"visibility_timeout": _cfg.max_timeout_seconds + 3600}

# Task events cost the worker about 0.7 ms of CPU per execution (measured by bench/throughput.py);
# Flower switches them on in the workers it watches, so they are paid only while someone looks.
worker_send_task_events = False
task_send_sent_event = False
worker_hijack_root_logger = False

# Schedules live in PostgreSQL (app/schedules); the sweeper and the other maintenance jobs run
# inside beat (workers/maintenance.py), not as tasks queued behind the work they rescue.
beat_scheduler = "workers.scheduler:DatabaseScheduler"
beat_schedule: dict = {}
