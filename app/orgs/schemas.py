from marshmallow import Schema, fields


class OrgSchema(Schema):
    id = fields.UUID()
    name = fields.String()


class TokenInfoSchema(Schema):
    id = fields.UUID()
    name = fields.String()
    role = fields.String(metadata={"enum": ["admin", "developer", "operator", "viewer"]})


class MeSchema(Schema):
    org = fields.Nested(OrgSchema)
    token = fields.Nested(TokenInfoSchema)
