"""Request and response bodies. The definition's deeper rules live in schemas/agent.json."""

from marshmallow import Schema, fields, validate

from app.agents.models import VISIBILITIES
from app.audit.schemas import created_by_field
from app.openapi import item_rule, rule
from app.versiondiff import BREAKING_RULES

PATTERNS = (
    "local `$ref` only (remote ones are refused, never fetched). `pattern` and "
    "`patternProperties` run on RE2 (linear time, so no pattern can stall a request): "
    "backreferences and lookaround are refused (422), `unevaluatedProperties` cannot be combined "
    "with `patternProperties`, `\\s` is ASCII whitespace, repetition counts stop at 1000"
)


KEY = {
    "pattern": r"^\$\.input(\.[A-Za-z0-9_-]+)+$",
    "maxLength": 255,
    "example": "$.input.customer_id",
    "description": "the group an execution counts in: a reference into its input, `$.input` "
    "followed by one or more `.name` segments (letters, digits, `_`, `-`). Absent: one group "
    "for the agent; an input without the value belongs to the group `null`",
}


class ConcurrencySchema(Schema):
    """At most `limit` executions of the agent run at once per value of `key`."""

    limit = fields.Integer(
        strict=True,
        required=True,
        metadata={"minimum": 1, "maximum": 10000, "description": "executions running at once"},
    )
    key = fields.String(metadata=KEY)
    on_limit = fields.String(
        metadata={
            "enum": ["queue", "cancel_running", "reject"],
            "default": "queue",
            "description": "what a new execution over the limit does. `queue`: it waits, "
            "queued, first in first out within its key (`waiting_for`: `agent_concurrency`). "
            "`cancel_running`: it cancels the key's running and waiting executions (error "
            "type `superseded`) and runs in their place. `reject`: its submit answers 409 "
            "and nothing is stored",
        }
    )


class RateLimitSchema(Schema):
    """At most `limit` executions of the agent start in any window of `period_seconds` per
    value of `key`."""

    limit = fields.Integer(
        strict=True,
        required=True,
        metadata={"minimum": 1, "maximum": 1000000, "description": "starts per window"},
    )
    # Raw: a JSON number as sent, whole or not (schemas/agent.json checks it; a string is 422).
    period_seconds = fields.Raw(
        required=True,
        metadata={
            "type": "number",
            "minimum": 0,
            "exclusiveMinimum": True,
            "maximum": 86400,
            "description": "the window, in seconds (sliding, over all workers)",
        },
    )
    key = fields.String(metadata=KEY)


CONCURRENCY = (
    "the agent's concurrency limit, or null for none; versioned (a change makes a new version) "
    "and replaced whole by a PATCH (null removes it)"
)
RATE_LIMIT = (
    "the agent's rate limit, or null for none; versioned (a change makes a new version) and "
    "replaced whole by a PATCH (null removes it)"
)

WALLET_POLICY = (
    "versioned (a change makes a new version) and replaced whole by a PATCH (null removes it: "
    "every transfer is then refused)"
)


CHANGELOG_MAX = 4000


def changelog_field() -> fields.String:
    return fields.String(
        validate=validate.Length(min=1, max=CHANGELOG_MAX),
        metadata={
            "description": "what the new version changes, kept on the version (only with a "
            "versioned change: otherwise 422)"
        },
    )


CONFIG = (
    "given to the agent as ctx.config. Any value, at any depth, may be "
    '`{"$secret": "<name>"}`: a secret of the organization (PUT /api/v1/secrets/{name}; an '
    "unknown name is a 422), replaced by its value on the worker at run time and never shown. "
    'Literal values are shown as `"***"` to operator and viewer'
)


RUNTIME = rule(
    "agent",
    "runtime",
    description="one of: `{type: python, entrypoint: module:function}` (the module under a "
    "prefix of RUNYARD_AGENT_MODULES), `{type: script, language: python, source}` "
    "(the source compiles), "
    "`{type: command, argv, env, cwd}` (argv[0] listed in RUNYARD_ALLOWED_COMMANDS), "
    "`{type: http, url, headers, timeout_seconds}` (the url's host public or listed in "
    "RUNYARD_HTTP_ALLOW_HOSTS; not the headers the runtime sets: Host, Content-Length, "
    "Content-Type, Transfer-Encoding, Connection). A command's `env` values and an http "
    'runtime\'s `headers` values may be `{"$secret": "<name>"}` (see `config`); literal header '
    'values are shown as `"***"` to operator and viewer',
)


class AgentDefinitionFields(Schema):
    description = fields.String(allow_none=True, metadata=rule("agent", "description"))
    runtime = fields.Dict(metadata=RUNTIME)
    input_schema = fields.Dict(metadata={"description": "JSON Schema Draft 2020-12; " + PATTERNS})
    output_schema = fields.Dict(metadata={"description": "JSON Schema Draft 2020-12; " + PATTERNS})
    timeout_seconds = fields.Integer(
        strict=True,
        metadata={
            "minimum": 1,
            "maximum": 86400,
            "description": "at most this installation's RUNYARD_MAX_TIMEOUT_SECONDS",
        },
    )
    retry = fields.Dict(metadata=rule("agent", "retry"))
    limits = fields.Dict(metadata=rule("agent", "limits"))
    queue = fields.String(
        metadata=rule("agent", "queue", description="Celery queue its executions go to")
    )
    capabilities = fields.List(
        # Raw: a name or an object (schemas/agent.json checks which).
        fields.Raw(metadata=item_rule("agent", "capabilities")),
        metadata=rule("agent", "capabilities"),
    )
    tags = fields.List(
        fields.String(metadata=item_rule("agent", "tags")), metadata=rule("agent", "tags")
    )
    config = fields.Dict(metadata={"description": CONFIG})
    concurrency = fields.Nested(
        ConcurrencySchema, allow_none=True, metadata={"description": CONCURRENCY}
    )
    rate_limit = fields.Nested(
        RateLimitSchema, allow_none=True, metadata={"description": RATE_LIMIT}
    )
    wallet_policy = fields.Dict(
        allow_none=True, metadata=rule("agent", "wallet_policy", description=WALLET_POLICY)
    )
    visibility = fields.String(
        validate=validate.OneOf(VISIBILITIES),
        metadata={
            "description": "`private` (the default): your organization's alone. `public`: "
            "listed in GET /api/v1/catalog and runnable by every organization (POST "
            "/api/v1/catalog/{org}/{agent}/executions), each run the caller's own; only an "
            "admin makes an agent public (403 otherwise). Not versioned: changes in place"
        },
    )


class AgentCreateSchema(AgentDefinitionFields):
    name = fields.String(required=True, metadata={"pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"})
    runtime = fields.Dict(required=True, metadata=RUNTIME)
    version = fields.String(
        metadata=rule("agent", "version", description="first version, default 1.0.0")
    )


class AgentPatchSchema(AgentDefinitionFields):
    version = fields.String(
        metadata=rule(
            "agent",
            "version",
            description="number of the new version, above every existing one and only with "
            "a versioned change; default: next patch number",
        )
    )
    changelog = changelog_field()
    force = fields.Boolean(
        load_default=False,
        metadata={
            "description": "make the new version even when it would break a chain that runs "
            "the agent unpinned, or refuse an input one of the agent's latest 100 succeeded "
            "executions had (without it, such a PATCH answers 409 naming each break in "
            "`errors`: `chain:<name>` or `execution:<id>`)"
        },
    )


class AgentSchema(AgentDefinitionFields):
    id = fields.UUID()
    name = fields.String()
    current_version = fields.String()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
    archived_at = fields.DateTime(allow_none=True)
    catalog_runs = fields.Integer(
        metadata={
            "description": "executions other organizations started through the catalog, "
            "counted as they were submitted (their inputs and outputs are theirs: you never "
            "see them)"
        }
    )


class AgentVersionSchema(Schema):
    id = fields.UUID()
    agent_id = fields.UUID()
    version = fields.String()
    runtime = fields.Dict()
    input_schema = fields.Dict()
    output_schema = fields.Dict()
    timeout_seconds = fields.Integer()
    retry = fields.Dict()
    limits = fields.Dict()
    queue = fields.String()
    capabilities = fields.List(
        fields.Raw(metadata=item_rule("agent", "capabilities")),
        metadata={"description": "as the definition gave them: names or objects"},
    )
    config = fields.Dict(metadata={"description": CONFIG})
    concurrency = fields.Nested(
        ConcurrencySchema, allow_none=True, metadata={"description": CONCURRENCY}
    )
    rate_limit = fields.Nested(
        RateLimitSchema, allow_none=True, metadata={"description": RATE_LIMIT}
    )
    wallet_policy = fields.Dict(
        allow_none=True, metadata=rule("agent", "wallet_policy", description=WALLET_POLICY)
    )
    changelog = fields.String(allow_none=True)
    created_at = fields.DateTime()
    created_by = created_by_field()


class AgentQuerySchema(Schema):
    q = fields.String(metadata={"description": "words (prefixes) of the name or description"})
    tag = fields.String()
    capability = fields.String()
    archived = fields.Boolean(
        load_default=False, metadata={"description": "include archived agents"}
    )


class RollbackSchema(Schema):
    version = fields.String(
        required=True,
        validate=validate.Length(min=1, max=32),
        metadata={"description": "an existing version to make current again", "example": "1.0.0"},
    )


class DiffQuerySchema(Schema):
    against = fields.String(
        validate=validate.Length(min=1, max=32),
        metadata={"description": "the version to compare from; default: the current version"},
    )


class BreakingChangeSchema(Schema):
    path = fields.String(metadata={"description": "JSON pointer into the definition"})
    reason = fields.String()


class VersionDiffSchema(Schema):
    from_ = fields.String(
        attribute="from", data_key="from", metadata={"description": "the `against` version"}
    )
    to = fields.String(metadata={"description": "the version in the path"})
    changes = fields.List(
        fields.Dict(),
        metadata={"description": "RFC 6902 operations that turn `from` into `to`"},
    )
    breaking = fields.List(
        fields.Nested(BreakingChangeSchema), metadata={"description": BREAKING_RULES}
    )
