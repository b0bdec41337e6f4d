from marshmallow import Schema, fields, validate

from app.secrets.references import NAME_PATTERN

NAME_DESCRIPTION = (
    f"the secret's name, matching `{NAME_PATTERN}` (lowercase letters, digits, - and _); "
    'agents refer to it as `{"$secret": "<name>"}`'
)


class SecretPutSchema(Schema):
    value = fields.String(
        required=True,
        validate=validate.Length(min=1, max=65536),
        metadata={
            "description": "the value, stored encrypted (AES-256-GCM) and never shown again: "
            "only a worker running an agent that refers to it reads it"
        },
    )


class SecretSchema(Schema):
    name = fields.String(metadata={"pattern": NAME_PATTERN, "description": NAME_DESCRIPTION})
    version = fields.Integer(metadata={"description": "1 at the first PUT, one more at each PUT"})
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
