from marshmallow import Schema, fields, validate

from app.orgs.models import ROLES


class OrgSchema(Schema):
    id = fields.UUID()
    name = fields.String()


class TokenInfoSchema(Schema):
    id = fields.UUID()
    name = fields.String()
    role = fields.String(metadata={"enum": list(ROLES)})


class MeSchema(Schema):
    org = fields.Nested(OrgSchema)
    token = fields.Nested(TokenInfoSchema)


class TokenCreateSchema(Schema):
    name = fields.String(
        required=True,
        validate=validate.Length(min=1, max=100),
        metadata={"description": "what the token is for (a person, a service)"},
    )
    role = fields.String(required=True, validate=validate.OneOf(ROLES))
    expires_in_days = fields.Integer(
        strict=True,
        validate=validate.Range(min=1, max=3650),
        metadata={"description": "the token stops working this many days from now; absent: never"},
    )


LAST_USED = (
    "when a request last used it, to the minute: each API process records a token's use at "
    "most once a minute (null: never used since this was recorded)"
)


class TokenSchema(TokenInfoSchema):
    created_at = fields.DateTime()
    expires_at = fields.DateTime(allow_none=True)
    last_used_at = fields.DateTime(allow_none=True, metadata={"description": LAST_USED})
    revoked_at = fields.DateTime(allow_none=True)


class IssuedTokenSchema(TokenSchema):
    token = fields.String(
        metadata={"description": "the secret, shown this once: only its hash is stored"}
    )
