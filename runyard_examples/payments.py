"""The example payments agent (README, "Payments agents"): `refund-order` refunds an order to
the customer's address from its own wallet, within its wallet_policy.

Before it can pay, an admin gives it a wallet (`POST /api/v1/agents/refund-order/wallet`, with
the wallet service's token in the secret `wallet-engine-token`); until then every refund it
asks for is refused (the decision's `wallet` rule), and it says so in its output.
"""

from __future__ import annotations

from typing import Any

import runyard_client


@runyard_client.agent(
    "refund-order",
    description="Refunds an order in USDC on base from its wallet, within its wallet_policy",
    input_schema={
        "type": "object",
        "required": ["order_id", "amount", "to"],
        "properties": {
            "order_id": {"type": "string", "minLength": 1, "maxLength": 64},
            "amount": {"type": "string", "pattern": "^[0-9]{1,12}(\\.[0-9]{1,6})?$"},
            "to": {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"},
        },
    },
    output_schema={
        "type": "object",
        "required": ["status", "decision_id"],
        "properties": {
            "status": {"enum": ["mined", "errored", "refused"]},
            "decision_id": {"type": ["string", "null"]},
            "queue_id": {"type": ["string", "null"]},
            "reason": {"type": "string"},
        },
    },
    capabilities=[{"name": "payments.refund", "chains": ["base"], "authority": "execute"}],
    wallet_policy={
        "max_per_transaction": "100.00",
        "max_per_day": "1000.00",
        "currency": "USDC",
        "chains": ["base"],
        "approval_over": "50.00",
    },
    timeout_seconds=60,
    tags=["finance", "example", "payments"],
)
def refund_order(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """Up to 50 USDC goes at once; above it the execution waits (holding no worker) for an
    admin to approve its decision; above 100, or past 1,000 today, it is refused."""
    # Imported here: discovering the agent (`runyard agents apply`) needs no worker code.
    from workers.context import TransferRefused

    try:
        paid = ctx.wallet.transfer(
            "base",
            payload["to"],
            payload["amount"],
            reason=f"refund of order {payload['order_id']}",
        )
    except TransferRefused as refused:
        return {
            "status": "refused",
            "decision_id": refused.decision.get("id"),
            "reason": refused.reason,
        }
    return {
        "status": paid["status"],
        "decision_id": paid["decision_id"],
        "queue_id": paid["queue_id"],
    }
