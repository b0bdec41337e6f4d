"""Bodies of the catalog: its entries and the submit of a catalog run."""

from marshmallow import Schema, fields

from app.executions.schemas import SubmitSchema


class CatalogQuerySchema(Schema):
    q = fields.String(metadata={"description": "words (prefixes) of the name or description"})
    capability = fields.String()


class CatalogEntrySchema(Schema):
    org = fields.String(metadata={"description": "the organization that owns the agent"})
    name = fields.String()
    description = fields.String(allow_none=True)
    input_schema = fields.Dict(metadata={"description": "of its current version"})
    output_schema = fields.Dict(metadata={"description": "of its current version"})
    current_version = fields.String()
    capabilities = fields.List(fields.String())


class CatalogSubmitSchema(SubmitSchema):
    """`input`, and optionally `version` and `priority`, as a submit of your own agent."""
