"""The audit trail's query and answer bodies."""

import datetime as dt

from marshmallow import Schema, fields, validate

ACTION = fields.String(
    validate=validate.Regexp(r"^[a-z_]+\.[a-z_]+$"),
    metadata={"description": "e.g. agent.update, execution.submit, token.revoke"},
)


class AuditQuerySchema(Schema):
    action = fields.String(validate=ACTION.validate, metadata=ACTION.metadata)
    object_type = fields.String(
        validate=validate.Length(min=1, max=32),
        metadata={"description": "agent, execution, chain, schedule, token, ..."},
    )
    object_id = fields.String(validate=validate.Length(min=1, max=200))
    actor = fields.String(
        validate=validate.Length(min=1, max=200),
        metadata={"description": "a token id, or the OS user of an admin command"},
    )
    since = fields.AwareDateTime(
        default_timezone=dt.UTC, metadata={"description": "at or after (ISO 8601, UTC)"}
    )
    until = fields.AwareDateTime(
        default_timezone=dt.UTC, metadata={"description": "before (ISO 8601, UTC)"}
    )


class AuditObjectSchema(Schema):
    type = fields.String()
    id = fields.String(allow_none=True)
    name = fields.String(allow_none=True)


class AuditEventSchema(Schema):
    seq = fields.Integer(metadata={"description": "per organization, from 1, without gaps"})
    at = fields.String(metadata={"description": "ISO 8601 UTC, microseconds"})
    actor = fields.Dict(
        metadata={
            "description": '{"token_id", "token_name", "role"}, or {"cli": "<os user>"} for '
            "an admin command"
        }
    )
    action = fields.String()
    object = fields.Nested(AuditObjectSchema)
    request_id = fields.String(
        allow_none=True, metadata={"description": "the request's X-Request-Id"}
    )
    ip = fields.String(allow_none=True, metadata={"description": "the caller's address"})
    changes = fields.List(
        fields.Dict(),
        allow_none=True,
        metadata={"description": "RFC 6902 operations from the old state to the new"},
    )
    prev_hash = fields.String(
        metadata={"description": "the hash of the event before (64 zeros for the first)"}
    )
    hash = fields.String(
        metadata={
            "description": "hex SHA-256 of prev_hash followed by the canonical JSON of the "
            "event without hash (sorted keys, no whitespace, ASCII)"
        }
    )


class CreatedBySchema(Schema):
    token_id = fields.UUID()
    token_name = fields.String()


def created_by_field() -> fields.Nested:
    """`created_by` of an answer: the token that made the row, null for what the system made."""
    return fields.Nested(
        CreatedBySchema,
        allow_none=True,
        metadata={
            "description": "the token that made it; null when Runyard made it (schedule fires, "
            "webhook runs, chain steps) or it predates the audit trail"
        },
    )
