"""Request and response bodies of events."""

import datetime as dt

from marshmallow import Schema, fields, validate

from app.audit.schemas import created_by_field
from app.events.services import MAX_DATA_BYTES, MAX_ID_CHARS
from app.triggers.schemas import EVENT_NAME

SENDER_ID_DESCRIPTION = (
    "the sender's id of the event: the same id within 24 hours is accepted once (a repeat "
    "answers `duplicate: true` and delivers nothing again)"
)


class EventSendSchema(Schema):
    name = fields.String(required=True, validate=EVENT_NAME.validate, metadata=EVENT_NAME.metadata)
    data = fields.Dict(
        load_default=dict,
        metadata={
            "description": f"any JSON object, up to {MAX_DATA_BYTES // 1024} kB as JSON; waits "
            "match on it and event triggers read it as `$.event.data...`"
        },
    )
    id = fields.String(
        validate=validate.Length(min=1, max=MAX_ID_CHARS),
        metadata={"description": SENDER_ID_DESCRIPTION + "; absent: a new UUID, never a repeat"},
    )


class EventStartErrorSchema(Schema):
    type = fields.String(
        metadata={
            "description": "reference_not_found (the input refers to what the event lacks), "
            "invalid_input (the target's input_schema refuses it), conflict (an archived "
            "target, a full concurrency key that rejects), quota_exceeded, refused"
        }
    )
    message = fields.String()
    hint = fields.String()


class EventStartedSchema(Schema):
    trigger_id = fields.UUID()
    execution_id = fields.UUID(metadata={"description": "the execution started (agent target)"})
    chain_execution_id = fields.UUID(
        metadata={"description": "the chain execution started (chain target)"}
    )
    error = fields.Nested(
        EventStartErrorSchema,
        metadata={"description": "why this trigger started nothing (the others still did)"},
    )


RESUMED = fields.List(
    fields.UUID(), metadata={"description": "the waiting executions this event resumed"}
)
STARTED = fields.List(
    fields.Nested(EventStartedSchema),
    metadata={
        "description": "one entry per event trigger that matched: the run it started, or the "
        "error that kept it from starting one"
    },
)


class EventAcceptedSchema(Schema):
    id = fields.UUID(metadata={"description": "the event (the first one, for a duplicate)"})
    event_id = fields.String(metadata={"description": "the sender's id, or the generated one"})
    name = fields.String()
    received_at = fields.DateTime()
    resumed = RESUMED
    started = STARTED
    duplicate = fields.Boolean(
        metadata={
            "description": "true: an event with this id was accepted within 24 hours; this "
            "one delivered nothing (resumed and started are empty)"
        }
    )


class EventSchema(Schema):
    id = fields.UUID()
    event_id = fields.String(metadata={"description": "the sender's id, or the generated one"})
    name = fields.String()
    data = fields.Dict()
    received_at = fields.DateTime()
    resumed = RESUMED
    started = STARTED
    created_by = created_by_field()


class EventQuerySchema(Schema):
    name = fields.String(validate=EVENT_NAME.validate, metadata=EVENT_NAME.metadata)
    since = fields.AwareDateTime(
        default_timezone=dt.UTC, metadata={"description": "received at or after (ISO 8601, UTC)"}
    )
    until = fields.AwareDateTime(
        default_timezone=dt.UTC, metadata={"description": "received before (ISO 8601, UTC)"}
    )
