from marshmallow import Schema, fields

from app.state.services import KEY_PATTERN, MAX_VALUE_BYTES

KEY_DESCRIPTION = f"the key, matching `{KEY_PATTERN}`"
VALUE_DESCRIPTION = (
    f"any JSON (an object, an array, a string, a number, true, false or null), at most "
    f"{MAX_VALUE_BYTES // 1024} kB as JSON"
)
VERSION_DESCRIPTION = (
    "1 at the first write, one more at each write after; the entry's ETag is this number, "
    'quoted ("3")'
)


class StatePutSchema(Schema):
    value = fields.Raw(required=True, allow_none=True, metadata={"description": VALUE_DESCRIPTION})


class StateKeySchema(Schema):
    key = fields.String(metadata={"pattern": KEY_PATTERN, "description": KEY_DESCRIPTION})
    version = fields.Integer(metadata={"description": VERSION_DESCRIPTION})
    updated_at = fields.DateTime()


class StateEntrySchema(StateKeySchema):
    value = fields.Raw(allow_none=True, metadata={"description": VALUE_DESCRIPTION})
