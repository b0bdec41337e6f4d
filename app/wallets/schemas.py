"""Request and response bodies of wallets and decisions."""

from marshmallow import Schema, fields, validate

from app.audit.schemas import CreatedBySchema
from app.wallets.models import DECISION_STATUSES

LABEL_MAX = 200


class WalletCreateSchema(Schema):
    label = fields.String(
        validate=validate.Length(min=1, max=LABEL_MAX),
        metadata={
            "description": "the wallet's label at the wallet service; default "
            '"runyard <organization>/<agent>"'
        },
    )


class WalletSchema(Schema):
    address = fields.String(metadata={"description": "the wallet's address on chain"})
    label = fields.String(allow_none=True)
    provider = fields.String(metadata={"enum": ["engine"], "description": "who made it"})
    created_at = fields.DateTime()


class DecisionQuerySchema(Schema):
    agent = fields.String(
        validate=validate.Length(min=1, max=63), metadata={"description": "agent name or id"}
    )
    execution_id = fields.UUID()
    status = fields.String(validate=validate.OneOf(DECISION_STATUSES))


STATUS = (
    "`refused` (a rule failed: `error` and `policy_check` say which), `awaiting_approval` "
    "(over the policy's approval_over: an admin approves or rejects), `rejected`, `queued` "
    "(allowed or approved; `queue_id` set once the wallet service took it), `sent`, `mined` "
    "(final), `errored` (final: failed, cancelled or reverted at the wallet service)"
)


class DecisionSchema(Schema):
    id = fields.UUID()
    agent = fields.String(metadata={"description": "the agent's name"})
    execution_id = fields.UUID(
        allow_none=True,
        metadata={"description": "the execution that asked (null once retention deleted it)"},
    )
    kind = fields.String(metadata={"enum": ["transfer"]})
    chain = fields.String()
    to = fields.String(metadata={"description": "the recipient's address"})
    amount = fields.String(metadata={"description": "a decimal string, in `currency`"})
    currency = fields.String(metadata={"description": "the policy's currency"})
    reason = fields.String(allow_none=True, metadata={"description": "the agent's reason"})
    policy_check = fields.Dict(
        metadata={
            "description": '`{"version", "rules": {"<rule>": {"passed", "detail"}}, '
            '"approval"?}`: each rule (authority, wallet, policy or chain, currency, recipient, '
            "max_per_transaction, max_per_day) and how it came out, for the agent version "
            "that asked"
        }
    )
    status = fields.String(metadata={"enum": list(DECISION_STATUSES), "description": STATUS})
    queue_id = fields.String(
        allow_none=True, metadata={"description": "the wallet service's id of the transfer"}
    )
    transaction_hash = fields.String(allow_none=True)
    error = fields.String(
        allow_none=True, metadata={"description": "why it was refused, rejected or errored"}
    )
    approved_by = fields.Nested(
        CreatedBySchema,
        allow_none=True,
        metadata={"description": "the admin token that approved or rejected it"},
    )
    created_at = fields.DateTime()
    updated_at = fields.DateTime()
