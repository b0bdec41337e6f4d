from marshmallow import Schema, fields, validate

from app.audit.schemas import created_by_field
from app.schedules.schemas import NAME, ONE_KIND, TargetSchema
from app.triggers.on_event import FILTER_PATH_PATTERN, MAX_FILTER_KEYS, NAME_PATTERN

EVENT_NAME = fields.String(
    validate=validate.Regexp(NAME_PATTERN, error="letters, digits and _ . : -, 1 to 200 of them"),
    metadata={
        "pattern": NAME_PATTERN,
        "description": "the event's name: letters, digits, `_ . : -`, up to 200",
    },
)


class OnEventSchema(Schema):
    name = fields.String(required=True, validate=EVENT_NAME.validate, metadata=EVENT_NAME.metadata)
    filter = fields.Dict(
        keys=fields.String(
            validate=validate.Regexp(FILTER_PATH_PATTERN, error="not a dotted path"),
            metadata={"pattern": FILTER_PATH_PATTERN},
        ),
        metadata={
            "description": "a dotted path in the event's data (keys joined by dots, none "
            "empty, each up to 200 characters; a number indexes a list) -> the value it must "
            'equal, e.g. `{"order.currency": "EUR"}`; every pair must match. Absent or '
            "empty: every event of the name",
            "maxProperties": MAX_FILTER_KEYS,
        },
    )


class TriggerCreateSchema(Schema):
    name = fields.String(required=True, validate=NAME)
    target = fields.Nested(TargetSchema, required=True, metadata=ONE_KIND)
    input = fields.Dict(
        load_default=dict,
        metadata={
            "description": "the target's input; a string value `$.event.<path>` is replaced by "
            "that part of the event: a webhook's delivered JSON body, or for `on_event` the "
            "event (`$.event.data.<path>`, `$.event.name`, `$.event.id`, `$.event.event_id`, "
            "`$.event.received_at`)"
        },
    )
    on_event = fields.Nested(
        OnEventSchema,
        metadata={
            "description": "start the target on each event of this name sent to POST "
            "/api/v1/events (and matching `filter`), instead of on a webhook: such a trigger "
            "has no secret and no URL"
        },
    )


class TriggerSchema(Schema):
    id = fields.UUID()
    name = fields.String()
    target = fields.Nested(TargetSchema, metadata=ONE_KIND)
    input = fields.Dict()
    url = fields.String(
        allow_none=True,
        metadata={"description": "POST here; no token, a signature instead (null: on_event)"},
    )
    secret = fields.String(
        metadata={"description": "HMAC key of a webhook trigger; shown once, at creation"}
    )
    on_event = fields.Nested(
        OnEventSchema,
        allow_none=True,
        metadata={"description": "the event it starts its target on; null for a webhook"},
    )
    created_at = fields.DateTime()
    created_by = created_by_field()


class DeliverySchema(Schema):
    execution_id = fields.UUID(metadata={"description": "the execution started (agent targets)"})
    chain_execution_id = fields.UUID(
        metadata={"description": "the chain execution started (chain targets)"}
    )
    trigger_id = fields.UUID()
