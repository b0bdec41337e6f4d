from marshmallow import Schema, fields

from app.audit.schemas import created_by_field
from app.schedules.schemas import NAME, TargetSchema


class TriggerCreateSchema(Schema):
    name = fields.String(required=True, validate=NAME)
    target = fields.Nested(TargetSchema, required=True)
    input = fields.Dict(
        load_default=dict,
        metadata={
            "description": "the target's input; a string value `$.event.<path>` is replaced by "
            "that part of the delivered JSON body"
        },
    )


class TriggerSchema(Schema):
    id = fields.UUID()
    name = fields.String()
    target = fields.Nested(TargetSchema)
    input = fields.Dict()
    url = fields.String(metadata={"description": "POST here; no token, a signature instead"})
    secret = fields.String(metadata={"description": "HMAC key; shown once, at creation"})
    created_at = fields.DateTime()
    created_by = created_by_field()


class DeliverySchema(Schema):
    execution_id = fields.UUID(metadata={"description": "the execution started (agent targets)"})
    chain_execution_id = fields.UUID(
        metadata={"description": "the chain execution started (chain targets)"}
    )
    trigger_id = fields.UUID()
