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
# On RabbitMQ, a delivery unacknowledged past the server's consumer_timeout (30 minutes by
# default) closes the worker's channel: raise it above RUNYARD_MAX_TIMEOUT_SECONDS (README).
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

if broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
    # RabbitMQ (README, "Choosing a broker"). Classic durable queues, not quorum queues: quorum
    # queues have no message priorities in RabbitMQ 3.10 (and only two levels from 3.12), and
    # the API's 0..9 must hold. Every queue Celery declares, those task_create_missing_queues
    # makes included, carries x-max-priority=9: RabbitMQ serves the highest first
    # (app/broker: the API's priority goes out as is). A queue that exists without it cannot be
    # declared again (PRECONDITION_FAILED: app/broker.QueueMismatch says what to do).
    task_queue_max_priority = 9
    # A message sent without a priority (notifications) is served first, as on Redis, where no
    # priority is kombu's 0, the most urgent.
    task_default_priority = 9
    # Persistent messages (Celery's default delivery mode, set again here as the promise it
    # is) in durable queues, and every publish waits for RabbitMQ's confirm (py-amqp's
    # confirm_publish): a publish that returned is on disk, so the row it stamps `dispatched`
    # is safe across a broker crash. The bulk publish (app/broker:_publish_confirmed) waits
    # once per batch instead of once a message.
    task_default_delivery_mode = "persistent"
    # (py-amqp ignores the Redis options above.)
    broker_transport_options["confirm_publish"] = True
    # A worker's remote-control (pidbox) queue is not exclusive to one connection: a worker whose
    # host was cut off reconnects while RabbitMQ still holds its old connection (until the
    # heartbeat times it out), and an exclusive queue would refuse the new one (RESOURCE_LOCKED)
    # and stop the worker instead of letting it serve again (tests/hosts). It is still deleted
    # once no worker consumes it.
    control_queue_exclusive = False

# Task events cost the worker about 0.7 ms of CPU per execution (measured by bench/throughput.py);
# Flower switches them on in the workers it watches, so they are paid only while someone looks.
worker_send_task_events = False
task_send_sent_event = False
worker_hijack_root_logger = False

# Schedules live in PostgreSQL (app/schedules); the sweeper and the other maintenance jobs run
# inside beat (workers/maintenance.py), not as tasks queued behind the work they rescue.
beat_scheduler = "workers.scheduler:DatabaseScheduler"
beat_schedule: dict = {}
