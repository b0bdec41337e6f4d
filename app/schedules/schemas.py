"""Request and response bodies of schedules and their history."""

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from app.audit.schemas import created_by_field
from app.schedules.models import CATCHUP, FIRE_KINDS, FIRE_STATUSES, OVERLAP

NAME = validate.Regexp(r"^[a-z0-9][a-z0-9_-]{0,62}$", error="lowercase letters, digits, - and _")


class TargetSchema(Schema):
    agent = fields.String(metadata={"description": "agent name"})
    chain = fields.String(
        metadata={"description": "chain name: each fire or delivery starts a chain execution"}
    )
    version = fields.String(
        metadata={"description": "pin the agent's or chain's version; default: the current one"}
    )

    @validates_schema
    def one_kind(self, data, **_kwargs):
        if ("agent" in data) == ("chain" in data):
            raise ValidationError('give exactly one of "agent" or "chain"', field_name="agent")


class ScheduleFields(Schema):
    target = fields.Nested(TargetSchema)
    cron = fields.String(
        metadata={"description": "5 fields, or 6 with seconds first: `0 2 * * *`, `*/5 * * * * *`"}
    )
    timezone = fields.String(metadata={"description": "IANA name; fire times follow its DST"})
    input = fields.Dict(metadata={"description": "checked against the target's input_schema"})
    enabled = fields.Boolean()
    overlap = fields.String(
        validate=validate.OneOf(OVERLAP),
        metadata={
            "description": "while the previous fire's execution (or chain execution) has not "
            "finished"
        },
    )
    catchup = fields.String(
        validate=validate.OneOf(CATCHUP),
        metadata={"description": "what runs of the fire times missed while no beat ran"},
    )
    catchup_window_seconds = fields.Integer(
        strict=True,
        validate=validate.Range(min=0, max=7 * 86400),
        metadata={"description": "how far back `all` (and `latest`) look"},
    )
    pause_after_failures = fields.Integer(
        strict=True,
        validate=validate.Range(min=0, max=1000),
        metadata={"description": "pause after this many failed fires in a row; 0 never"},
    )


class ScheduleCreateSchema(ScheduleFields):
    name = fields.String(required=True, validate=NAME)
    target = fields.Nested(TargetSchema, required=True)
    cron = fields.String(required=True)
    timezone = fields.String(load_default="UTC")
    input = fields.Dict(load_default=dict)
    enabled = fields.Boolean(load_default=True)
    overlap = fields.String(load_default="skip", validate=validate.OneOf(OVERLAP))
    catchup = fields.String(load_default="latest", validate=validate.OneOf(CATCHUP))
    catchup_window_seconds = fields.Integer(
        strict=True, load_default=3600, validate=validate.Range(min=0, max=7 * 86400)
    )
    pause_after_failures = fields.Integer(
        strict=True, load_default=0, validate=validate.Range(min=0, max=1000)
    )


class SchedulePatchSchema(ScheduleFields):
    name = fields.String(validate=NAME)


class ScheduleSchema(ScheduleFields):
    id = fields.UUID()
    name = fields.String()
    consecutive_failures = fields.Integer()
    next_fire_at = fields.DateTime(allow_none=True, metadata={"description": "null while paused"})
    last_fire_at = fields.DateTime(allow_none=True)
    last_execution_id = fields.UUID(
        allow_none=True,
        metadata={
            "description": "the last fire's execution, or chain execution for a chain target"
        },
    )
    paused_reason = fields.String(allow_none=True)
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
    created_by = created_by_field()


class FireSchema(Schema):
    fire_time = fields.DateTime(metadata={"description": "the cron time (now, for a manual fire)"})
    fired_at = fields.DateTime(metadata={"description": "when beat (or the API) recorded it"})
    kind = fields.String(metadata={"enum": list(FIRE_KINDS)})
    status = fields.String(metadata={"enum": list(FIRE_STATUSES)})
    skipped_reason = fields.String(
        allow_none=True, metadata={"description": "why it was skipped, buffered or failed"}
    )
    execution_id = fields.UUID(allow_none=True, metadata={"description": "agent targets"})
    chain_execution_id = fields.UUID(allow_none=True, metadata={"description": "chain targets"})
    execution_status = fields.String(
        allow_none=True, metadata={"description": "the execution's or chain execution's status"}
    )
