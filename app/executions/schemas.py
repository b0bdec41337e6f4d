import datetime as dt

from marshmallow import EXCLUDE, Schema, fields, validate

from app.audit.schemas import created_by_field
from app.documents.schemas import AttachedDocumentSchema, documents_field
from app.executions.spec import JOURNAL_KINDS, LEVELS, LIMIT_WAITS, STATUSES, TERMINAL_STATUSES


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
    documents = documents_field()


class AssignedSubmitSchema(Schema):
    capability = fields.String(
        required=True,
        validate=validate.Length(min=1, max=63),
        metadata={"description": "run on one of the organization's agents that has it"},
    )
    input = fields.Dict(
        required=True,
        metadata={"description": "checked against each candidate's input_schema"},
    )
    provider = fields.String(
        validate=validate.Length(min=1, max=63),
        metadata={"description": "only agents whose capability names this provider"},
    )
    chain = fields.String(
        validate=validate.Length(min=1, max=63),
        metadata={"description": "only agents whose capability names this chain"},
    )
    priority = priority_field("0..9, higher runs first")


class AssignmentCandidateSchema(Schema):
    agent = fields.String()
    load = fields.Integer(metadata={"description": "its executions queued and running"})


class AssignmentSchema(Schema):
    capability = fields.String()
    candidates = fields.List(
        fields.Nested(AssignmentCandidateSchema),
        metadata={
            "description": "the agents that had the capability (and the provider and chain "
            "asked for) and accepted the input, in the order they were considered: the least "
            "loaded first, equal loads by who was last given work longest ago; the first ran it"
        },
    )


class BatchItemSchema(Schema):
    input = fields.Dict(required=True, metadata={"description": "checked against input_schema"})
    priority = priority_field("0..9, higher runs first")
    documents = documents_field()


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
    rerun_of = fields.UUID(
        allow_none=True,
        metadata={
            "description": "the execution this one reruns (POST /executions/{id}/rerun or the "
            "bulk rerun); on a chain step, the step execution whose outcome it reuses"
        },
    )
    parent_execution_id = fields.UUID(
        allow_none=True,
        metadata={"description": "the durable execution that started this one (ctx.run)"},
    )
    children = fields.List(
        fields.UUID(),
        metadata={"description": "the executions this one started with ctx.run / ctx.start"},
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
    created_by = created_by_field()
    assigned_by = fields.Nested(
        AssignmentSchema,
        allow_none=True,
        metadata={
            "description": "how POST /api/v1/executions chose the agent by capability and "
            "load; null when the submit named the agent"
        },
    )
    documents = fields.List(
        fields.Nested(AttachedDocumentSchema),
        metadata={
            "description": "the documents the execution was handed, in the submit's order "
            "(empty when none); on GET /executions/{id} and where an execution is shown as "
            "GET shows it (a submit's answer, the event stream's `end`, a notification's "
            "`data`), not on lists (one more read per execution)"
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
    limit = fields.Integer(
        load_default=1000,
        validate=validate.Range(min=1, max=10000),
        metadata={"description": "lines at most (json only: an export has no cap)"},
    )
    format = fields.String(
        load_default="json",
        validate=validate.OneOf(["json", "ndjson", "csv"]),
        metadata={
            "description": "json (default): a JSON array of up to `limit` lines. ndjson "
            "(application/x-ndjson, a line object a line) or csv (text/csv, a header then "
            "seq,ts,level,message,fields,attempt; fields as JSON text): every line the other "
            "filters keep, streamed as a download, no cap"
        },
    )


class LogSearchQuerySchema(Schema):
    agent = fields.String(metadata={"description": "agent id or name"})
    execution_id = fields.UUID(
        metadata={"description": "one execution's lines; another organization's matches none"}
    )
    level = fields.String(
        validate=validate.OneOf(list(LEVELS)), metadata={"description": "minimum level"}
    )
    q = fields.String(
        validate=validate.Length(min=1, max=1000),
        metadata={
            "description": "text the message contains (case-insensitive). Without execution_id "
            "it searches at most RUNYARD_LOG_SEARCH_MAX_DAYS (default 7) of lines: since "
            "defaults to that long before until (or now), and a wider since..until is a 422"
        },
    )
    since = fields.AwareDateTime(
        default_timezone=dt.UTC, metadata={"description": "logged at or after (ISO 8601, UTC)"}
    )
    until = fields.AwareDateTime(
        default_timezone=dt.UTC, metadata={"description": "logged before (ISO 8601, UTC)"}
    )


class LogLineSchema(Schema):
    seq = fields.Integer()
    ts = fields.DateTime()
    level = fields.String(metadata={"enum": list(LEVELS)})
    message = fields.String()
    # `fields` would shadow the marshmallow module inside this class body.
    fields_ = fields.Dict(data_key="fields", attribute="fields")
    attempt = fields.Integer()


VERSION_CHOICE = (
    "`same` (default: the version the original ran), `current` (the agent's current version) "
    "or `x.y.z` (a version of the agent; one it lacks answers 404)"
)


class RerunSchema(Schema):
    input = fields.Dict(
        metadata={
            "description": "a new input, checked against the chosen version's "
            "input_schema; default: the original's input"
        }
    )
    version = fields.String(load_default="same", metadata={"description": VERSION_CHOICE})


class RerunFilterSchema(Schema):
    agent = fields.String(metadata={"description": "agent id or name"})
    status = fields.List(
        fields.String(validate=validate.OneOf(TERMINAL_STATUSES)),
        validate=validate.Length(min=1),
        metadata={"description": "finished statuses only: only finished executions are rerun"},
    )
    error_type = fields.String(metadata={"description": "the error's `type`, e.g. `timeout`"})
    finished_after = fields.AwareDateTime(
        default_timezone=dt.UTC, metadata={"description": "finished at or after (ISO 8601)"}
    )
    finished_before = fields.AwareDateTime(
        default_timezone=dt.UTC, metadata={"description": "finished before (ISO 8601)"}
    )


class BulkRerunSchema(Schema):
    filter = fields.Nested(
        RerunFilterSchema,
        load_default=dict,
        metadata={
            "description": "which finished executions to rerun (chain steps never "
            "match: rerun their chain); every field optional"
        },
    )
    version = fields.String(load_default="same", metadata={"description": VERSION_CHOICE})
    dry_run = fields.Boolean(
        load_default=False, metadata={"description": 'only count: 200 {"matched": N}'}
    )
    limit = fields.Integer(
        data_key="max",
        load_default=1000,
        validate=validate.Range(min=1, max=10000),
        metadata={
            "description": "rerun at most this many, those that finished first "
            "(default 1000); `matched` still counts all"
        },
    )


class BulkRerunResultSchema(Schema):
    matched = fields.Integer(metadata={"description": "every execution the filter matches"})
    ids = fields.List(
        fields.UUID(),
        metadata={
            "description": "the new executions, in the order their originals finished "
            "(absent on a dry run)"
        },
    )


class LogSearchLineSchema(LogLineSchema):
    execution_id = fields.UUID()
    agent_name = fields.String()


class EventStreamHeadersSchema(Schema):
    class Meta:
        unknown = EXCLUDE  # every other header of the request

    last_event_id = fields.Integer(
        data_key="Last-Event-ID",
        strict=False,
        validate=validate.Range(min=0, max=2**31 - 1),
        metadata={"description": "resume after the log line with this seq"},
    )


class JournalEntrySchema(Schema):
    seq = fields.Integer()
    kind = fields.String(metadata={"enum": list(JOURNAL_KINDS)})
    name = fields.String(
        metadata={
            "description": "the step's name, the child's agent, sleep or sleep_until, the event"
        }
    )
    status = fields.String(
        metadata={
            "description": "a step: done; a child: pending, then its terminal status; a sleep: "
            "pending, then done; an event wait: pending, then received or timed_out"
        }
    )
    result = fields.Raw(
        allow_none=True,
        metadata={
            "description": "a step's recorded result; a child's {output, error}; the data of "
            "the event a wait received"
        },
    )
    at = fields.DateTime(metadata={"description": "when the call was recorded or last changed"})
    child_execution_id = fields.UUID(allow_none=True)
    due_at = fields.DateTime(
        allow_none=True, metadata={"description": "a sleep's due time, an event wait's timeout"}
    )
