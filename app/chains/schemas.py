"""Request and response bodies. The definition's deeper rules live in schemas/chain.json."""

from marshmallow import Schema, fields, validate

from app.agents.schemas import PATTERNS, changelog_field
from app.audit.schemas import created_by_field
from app.chains.models import CHAIN_STATUSES
from app.executions.schemas import ErrorInfoSchema, priority_field


class ChainDefinitionFields(Schema):
    description = fields.String(allow_none=True)
    input_schema = fields.Dict(
        metadata={"description": "JSON Schema Draft 2020-12 of the chain's input; " + PATTERNS}
    )
    steps = fields.List(
        fields.Dict(),
        metadata={
            "description": "`{name, agent, version?, input?, compensate?}` or "
            "`{name, parallel: [steps]}`; see schemas/chain.json"
        },
    )
    on_failure = fields.String(
        validate=validate.OneOf(["stop", "continue"]),
        metadata={
            "description": "`stop` (default): the chain fails, later steps are skipped and the "
            "compensations of the steps that succeeded run, latest first. `continue`: later "
            "steps run; a failed step's output reads as absent; the chain ends `failed` if any "
            "step failed, with the last step's output."
        },
    )


class ChainCreateSchema(ChainDefinitionFields):
    name = fields.String(required=True, metadata={"pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"})
    steps = fields.List(fields.Dict(), required=True)
    version = fields.String(metadata={"description": "first version, default 1.0.0"})


class ChainPatchSchema(ChainDefinitionFields):
    version = fields.String(
        metadata={"description": "number of the new version; default: next patch number"}
    )
    changelog = changelog_field()


class ChainSchema(ChainDefinitionFields):
    id = fields.UUID()
    name = fields.String()
    current_version = fields.String()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
    archived_at = fields.DateTime(allow_none=True)


class ChainVersionSchema(Schema):
    id = fields.UUID()
    chain_id = fields.UUID()
    version = fields.String()
    input_schema = fields.Dict()
    steps = fields.List(fields.Dict())
    on_failure = fields.String()
    changelog = fields.String(allow_none=True)
    created_at = fields.DateTime()
    created_by = created_by_field()


class ChainQuerySchema(Schema):
    archived = fields.Boolean(load_default=False, metadata={"description": "include archived"})


class ChainSubmitSchema(Schema):
    input = fields.Dict(required=True, metadata={"description": "checked against input_schema"})
    version = fields.String(metadata={"description": "pin a chain version; default: current"})
    priority = priority_field("0..9, higher runs first; every step inherits it")


class ChainStepSchema(Schema):
    name = fields.String()
    stage = fields.Integer(metadata={"description": "steps of one stage run at once"})
    status = fields.String(
        metadata={
            "description": "`pending` (not started), `skipped` (never will), `reused` (a rerun "
            "took its output from the chain execution it reruns; its execution is a copy, run "
            "by no worker, whose rerun_of names the original step's execution), or the status "
            "of its execution"
        }
    )
    execution_id = fields.UUID(allow_none=True)
    agent_name = fields.String(allow_none=True)
    agent_version = fields.String(allow_none=True)
    attempts = fields.Integer()
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)


class ChainExecutionSchema(Schema):
    id = fields.UUID()
    chain_id = fields.UUID()
    chain_name = fields.String()
    chain_version = fields.String()
    status = fields.String(metadata={"enum": list(CHAIN_STATUSES)})
    priority = fields.Integer()
    input = fields.Dict()
    output = fields.Dict(allow_none=True, metadata={"description": "the last step's output"})
    error = fields.Nested(ErrorInfoSchema, allow_none=True)
    rerun_of = fields.UUID(
        allow_none=True, metadata={"description": "the chain execution this one reruns"}
    )
    steps = fields.List(
        fields.Nested(ChainStepSchema),
        metadata={"description": "the chain's steps, in definition order; steps only"},
    )
    compensations = fields.List(
        fields.Nested(ChainStepSchema),
        metadata={
            "description": "after a `stop` failure, the compensations in the order they run "
            "(latest succeeded step first); `name` is the step each one undoes. Empty unless "
            "the chain stopped on a failure"
        },
    )
    queued_at = fields.DateTime()
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
    duration_ms = fields.Integer(allow_none=True)
    created_by = created_by_field()


class ChainExecutionQuerySchema(Schema):
    chain = fields.String(metadata={"description": "chain id or name"})
    status = fields.String(validate=validate.OneOf(CHAIN_STATUSES))


class ChainRerunSchema(Schema):
    from_ = fields.String(
        data_key="from",
        attribute="from",
        load_default="failed",
        metadata={
            "description": "`failed` (default: from the first stage with a step that did not "
            "succeed) or a step's name (from that step's stage: the steps of a parallel "
            "group run again together)"
        },
    )
