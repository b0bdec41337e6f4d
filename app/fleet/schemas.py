"""Response bodies of the fleet routes."""

from marshmallow import Schema, fields


class WorkerSchema(Schema):
    name = fields.String(metadata={"description": "Celery node name (`-n`), e.g. `celery@host-1`"})
    queues = fields.List(
        fields.String(), metadata={"description": "queues it consumes (`-Q`), sorted"}
    )
    concurrency = fields.Integer(
        allow_none=True,
        metadata={"description": "pool size (`-c`): executions it can run at once"},
    )
    active_executions = fields.Integer(
        metadata={
            "description": "executions it is running now: agent runs received from the broker "
            "and started in its pool (not the ones waiting in the queue, not sweeper runs)"
        }
    )
    last_heartbeat = fields.DateTime(
        metadata={
            "description": "when this API process got the worker's latest reply to the "
            "remote-control inspection (workers send no event heartbeats: task events are "
            "off); at most a few seconds old, see the route's description"
        }
    )
