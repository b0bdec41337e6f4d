"""Bodies of GET /api/v1/agents/{ref}/stats."""

from marshmallow import Schema, fields, validate

from app.executions.schemas import ErrorInfoSchema
from app.stats.services import DEGRADED_BELOW, FAILING_BELOW, WINDOWS

HEALTH = (
    "over the window's executions that ran to an outcome (succeeded, failed, timed_out; "
    "cancelled ones do not count): `idle` when there were none, `failing` when the success rate "
    f"is below {FAILING_BELOW}, `degraded` when it is below {DEGRADED_BELOW}, else `healthy`"
)
PRECISION = (
    "milliseconds, read from log-spaced histograms: within 9% of the exact value; null when "
    "nothing was measured"
)


class StatsQuerySchema(Schema):
    window = fields.String(
        load_default="24h",
        validate=validate.OneOf(list(WINDOWS)),
        metadata={"description": "how far back finished executions count (default 24h)"},
    )


class PercentilesSchema(Schema):
    p50 = fields.Float(allow_none=True)
    p95 = fields.Float(allow_none=True)
    p99 = fields.Float(allow_none=True)


class LastFailureSchema(Schema):
    execution_id = fields.UUID()
    error = fields.Nested(ErrorInfoSchema, allow_none=True)
    finished_at = fields.DateTime()


class AgentStatsSchema(Schema):
    window = fields.String()
    counts = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(),
        metadata={
            "description": "executions by status: `queued`, `running` and `waiting` right now, the "
            "finished statuses over the window (by finished_at, from the start of its first "
            "minute)"
        },
    )
    success_rate = fields.Float(
        allow_none=True,
        metadata={
            "description": "succeeded / (succeeded + failed + timed_out) over the window; "
            "null when none ran to an outcome"
        },
    )
    duration_ms = fields.Nested(
        PercentilesSchema, metadata={"description": f"started to finished, {PRECISION}"}
    )
    queue_wait_ms = fields.Nested(
        PercentilesSchema, metadata={"description": f"queued to started, {PRECISION}"}
    )
    last_failure = fields.Nested(
        LastFailureSchema,
        allow_none=True,
        metadata={"description": "the latest failed or timed_out execution in the window"},
    )
    health = fields.String(
        metadata={"enum": ["healthy", "degraded", "failing", "idle"], "description": HEALTH}
    )
