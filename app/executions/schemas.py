import datetime as dt

from marshmallow import EXCLUDE, Schema, fields, validate

from app.executions.spec import LEVELS, LIMIT_WAITS, STATUSES


def priority_field(description: str) -> fields.Integer:
    return fields.Integer(
        strict=True,
        load_default=5,
        validate=validate.Range(min=0, max=9),
        metadata={"description": description},
    )


class SubmitSchema(Schema):
    input = fields.Dict(required=True, metadata={"description": "checked against input_schema"})
    version = fields.String(metadata={"description": "pin a version; default: the current one"})
    priority = priority_field("0..9, higher runs first")


class BatchItemSchema(Schema):
    input = fields.Dict(required=True, metadata={"description": "checked against input_schema"})
    priority = priority_field("0..9, higher runs first")


class BatchSubmitSchema(Schema):
    items = fields.List(
        fields.Nested(BatchItemSchema),
        required=True,
        validate=validate.Length(min=1, max=1000),
        metadata={"description": "1..1000 items, all stored and queued or none"},
    )
    version = fields.String(metadata={"description": "pin a version; default: the current one"})


class BatchSchema(Schema):
    ids = fields.List(fields.UUID(), metadata={"description": "the executions, in item order"})


class ErrorInfoSchema(Schema):
    type = fields.String(
        metadata={
            "description": "input_invalid, output_invalid, runtime_error, timeout, cancelled, "
            "lost, and the limits: memory_limit, cpu_limit, output_too_large, file_size_limit "
            "(RUNYARD_CHILD_MAX_FILE_MB), process_limit (RUNYARD_CHILD_MAX_PROCESSES)"
        }
    )
    message = fields.String()
    hint = fields.String()


class ResourceUsageSchema(Schema):
    cpu_seconds = fields.Float()
    max_rss_mb = fields.Float()
    wall_ms = fields.Integer()


class ProgressSchema(Schema):
    fraction = fields.Float(metadata={"description": "0..1, as the agent last reported it"})
    message = fields.String(allow_none=True)
    at = fields.String(metadata={"description": "when it was reported (ISO 8601, UTC)"})


class ExecutionSchema(Schema):
    id = fields.UUID()
    agent_id = fields.UUID()
    agent_name = fields.String()
    agent_version = fields.String()
    status = fields.String(metadata={"enum": list(STATUSES)})
    priority = fields.Integer()
    input = fields.Dict()
    output = fields.Dict(allow_none=True)
    error = fields.Nested(ErrorInfoSchema, allow_none=True)
    attempts = fields.Integer()
    queued_at = fields.DateTime()
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
    duration_ms = fields.Integer(allow_none=True)
    resource_usage = fields.Nested(ResourceUsageSchema, allow_none=True)
    chain_execution_id = fields.UUID(
        allow_none=True, metadata={"description": "the chain execution this step belongs to"}
    )
    waiting_for = fields.String(
        allow_none=True,
        metadata={
            "enum": list(LIMIT_WAITS),
            "description": "why a queued execution has not been let out to start: the "
            "organization's max_running, the agent's concurrency or its rate_limit; null "
            "otherwise (it waits only for its turn)",
        },
    )
    progress = fields.Nested(
        ProgressSchema,
        allow_none=True,
        metadata={"description": "the agent's last ctx.progress(fraction, message), or null"},
    )
    traceparent = fields.String(
        allow_none=True,
        metadata={
            "description": "the W3C traceparent header of the submit (a malformed one is "
            "ignored), handed to the runtime: ctx.traceparent, TRACEPARENT, the http header"
        },
    )


class AttemptSchema(Schema):
    attempt = fields.Integer(metadata={"description": "1 for the first run"})
    status = fields.String(
        metadata={
            "enum": list(STATUSES),
            "description": "how this attempt ended (`running` for the current one); a retried "
            "attempt reads `failed` or `timed_out` with its own error",
        }
    )
    error = fields.Nested(ErrorInfoSchema, allow_none=True)
    worker = fields.String(allow_none=True, metadata={"description": "the Celery worker's name"})
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
    resource_usage = fields.Nested(ResourceUsageSchema, allow_none=True)


class ExecutionQuerySchema(Schema):
    agent = fields.String(metadata={"description": "agent id or name"})
    status = fields.String(validate=validate.OneOf(STATUSES))
    since = fields.AwareDateTime(
        default_timezone=dt.UTC, metadata={"description": "queued at or after (ISO 8601, UTC)"}
    )
    until = fields.AwareDateTime(
        default_timezone=dt.UTC, metadata={"description": "queued before (ISO 8601, UTC)"}
    )
    chain_execution_id = fields.UUID(metadata={"description": "the steps of one chain execution"})


class LogQuerySchema(Schema):
    level = fields.String(
        validate=validate.OneOf(list(LEVELS)), metadata={"description": "minimum level"}
    )
    q = fields.String(metadata={"description": "text the message contains (case-insensitive)"})
    # seq is a 32-bit column: a larger number would reach PostgreSQL as an error, not a 422.
    after_seq = fields.Integer(strict=False, validate=validate.Range(min=0, max=2**31 - 1))
    limit = fields.Integer(load_default=1000, validate=validate.Range(min=1, max=10000))


class LogLineSchema(Schema):
    seq = fields.Integer()
    ts = fields.DateTime()
    level = fields.String(metadata={"enum": list(LEVELS)})
    message = fields.String()
    # `fields` would shadow the marshmallow module inside this class body.
    fields_ = fields.Dict(data_key="fields", attribute="fields")
    attempt = fields.Integer()


class EventStreamHeadersSchema(Schema):
    class Meta:
        unknown = EXCLUDE  # every other header of the request

    last_event_id = fields.Integer(
        data_key="Last-Event-ID",
        strict=False,
        validate=validate.Range(min=0, max=2**31 - 1),
        metadata={"description": "resume after the log line with this seq"},
    )
