from marshmallow import Schema, fields


class LimitsSchema(Schema):
    max_running = fields.Integer(
        allow_none=True,
        metadata={
            "description": "executions running at once, over all workers; the rest wait, "
            "queued (`waiting_for`: `org_max_running`), and nothing is refused"
        },
    )
    max_queued = fields.Integer(
        allow_none=True,
        metadata={"description": "executions not yet started; a submit past it is a 429"},
    )
    submit_rate = fields.Float(
        allow_none=True, metadata={"description": "submits a second, over every API process"}
    )
    submit_burst = fields.Integer(
        allow_none=True, metadata={"description": "submits at once above the rate"}
    )
    cpu_seconds_per_day = fields.Float(
        allow_none=True,
        metadata={"description": "CPU the executions may use per UTC day before submits are 429"},
    )
    weight = fields.Integer(
        metadata={
            "minimum": 1,
            "maximum": 1000,
            "description": "share of a busy queue: organizations with executions ready start "
            "them in turn, weighted by this (default 1; never null)",
        }
    )

    retention_days = fields.Integer(
        allow_none=True,
        metadata={
            "description": "days its finished executions (with their logs) are kept before "
            "beat deletes them; null: the installation's RUNYARD_RETENTION_DAYS"
        },
    )


class UsageNowSchema(Schema):
    running = fields.Integer()
    queued = fields.Integer()
    cpu_seconds_today = fields.Float(metadata={"description": "since 00:00 UTC"})


class QueueUsageSchema(Schema):
    queue = fields.String()
    queued = fields.Integer()
    oldest_queued_age_seconds = fields.Float()


class UsageSchema(Schema):
    limits = fields.Nested(LimitsSchema, metadata={"description": "null: no limit"})
    usage = fields.Nested(UsageNowSchema)
    queues = fields.List(fields.Nested(QueueUsageSchema))


# What a route answers when a quota refuses it (app/flow/quotas.py), for its OpenAPI entry.
QUOTA_REFUSED = (
    "a quota of the organization refuses it for now (`errors.limit`: max_queued, submit_rate "
    "or cpu_seconds_per_day); nothing is stored, and the Idempotency-Key stays free"
)


def _header(description: str) -> dict:
    return {"description": description, "schema": {"type": "integer"}}


QUOTA_HEADERS = {
    "Retry-After": _header("seconds to wait before submitting again"),
    "RateLimit-Limit": _header("submit_rate refusals: the burst"),
    "RateLimit-Remaining": _header("submit_rate refusals: submits left now (0)"),
    "RateLimit-Reset": _header("submit_rate refusals: seconds until the burst is full again"),
}
