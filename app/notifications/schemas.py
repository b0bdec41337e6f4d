"""Request and response bodies of notifications (outbound webhooks) and their deliveries."""

from marshmallow import Schema, fields, validate

from app.notifications.models import DELIVERY_STATUSES, EVENT_TYPES
from app.schedules.schemas import NAME

EVENTS = fields.List(
    fields.String(validate=validate.OneOf(EVENT_TYPES)),
    validate=validate.Length(min=1, max=len(EVENT_TYPES)),
    metadata={"description": "the event types to deliver", "items": {"enum": list(EVENT_TYPES)}},
)
URL = fields.String(
    validate=validate.Length(max=2048),
    metadata={
        "description": "http(s) URL the events are POSTed to; its host must pass the http "
        "runtime's address guard (public addresses, or hosts in RUNYARD_HTTP_ALLOW_HOSTS)",
        # http(s), then an RFC 3986 host name or IPv4 address, with user and port optional.
        "pattern": r"^[Hh][Tt][Tt][Pp][Ss]?://([A-Za-z0-9._~%!$&'()*+,;=:-]*@)?"
        r"[A-Za-z0-9._~%!$&'()*+,;=-]+(:[0-9]{1,4})?([/?#]\S*)?$",
    },
)


class FilterSchema(Schema):
    agents = fields.List(
        fields.String(validate=validate.Length(min=1, max=63)),
        validate=validate.Length(min=1, max=100),
        metadata={
            "description": "agent names: execution events of these agents only (other event "
            "types are not narrowed)"
        },
    )


class NotificationCreateSchema(Schema):
    name = fields.String(required=True, validate=NAME)
    url = fields.String(required=True, validate=URL.validate, metadata=URL.metadata)
    events = fields.List(
        EVENTS.inner, required=True, validate=EVENTS.validate, metadata=EVENTS.metadata
    )
    filter = fields.Nested(FilterSchema, load_default=dict)


class NotificationPatchSchema(Schema):
    name = fields.String(validate=NAME)
    url = fields.String(validate=URL.validate, metadata=URL.metadata)
    events = fields.List(EVENTS.inner, validate=EVENTS.validate, metadata=EVENTS.metadata)
    filter = fields.Nested(FilterSchema, metadata={"description": "{} removes the filter"})


class NotificationSchema(Schema):
    id = fields.UUID()
    name = fields.String()
    url = fields.String()
    events = fields.List(fields.String())
    filter = fields.Nested(FilterSchema)
    secret = fields.String(
        metadata={
            "description": "the HMAC-SHA256 key of Runyard-Signature; shown once, at creation"
        }
    )
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class NotificationDeliverySchema(Schema):
    event_id = fields.UUID()
    type = fields.String(metadata={"enum": list(EVENT_TYPES)})
    status = fields.String(metadata={"enum": list(DELIVERY_STATUSES)})
    attempts = fields.Integer()
    last_status_code = fields.Integer(allow_none=True)
    last_error = fields.String(allow_none=True)
    next_attempt_at = fields.DateTime(
        allow_none=True, metadata={"description": "when it is tried next; null once it ended"}
    )
    delivered_at = fields.DateTime(allow_none=True)
    created_at = fields.DateTime()


class RedeliverSchema(Schema):
    event_id = fields.UUID()
    status = fields.String(metadata={"enum": ["pending"]})
