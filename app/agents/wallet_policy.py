"""An agent's `wallet_policy`: what its transfers may spend (ctx.wallet.transfer, app/wallets).

    {"max_per_transaction": "100.00", "max_per_day": "1000.00", "currency": "USDC",
     "chains": ["base"], "recipients"?: ["0x..."], "approval_over"?: "50.00"}

schemas/agent.json holds the shapes (amounts are decimal strings of at most 18 decimals); this
module adds what a schema cannot say: amounts above zero and in order (`approval_over` <=
`max_per_transaction` <= `max_per_day`), and which changes from one version to the next
tighten the policy (breaking: transfers that passed may now be refused). A loosened policy is
not breaking (nothing that worked stops working): the diff's `changes` and the audit trail
show it.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from app.errors import ValidationFailed

FIELD = "wallet_policy"
AMOUNTS = ("approval_over", "max_per_transaction", "max_per_day")
MAX_DECIMALS = 18
# As schemas/agent.json's `amount`: plain decimal notation, numeric(38, 18)'s digits.
DECIMAL = re.compile(r"(0|[1-9][0-9]{0,19})(\.[0-9]{1,18})?")
HINT = (
    'wallet_policy is {"max_per_transaction": "100.00", "max_per_day": "1000.00", "currency": '
    '"USDC", "chains": ["base"], "recipients"?: ["0x..."], "approval_over"?: "50.00"}: amounts '
    "as decimal strings above 0 with at most 18 decimals, approval_over <= max_per_transaction "
    "<= max_per_day; null: every transfer is refused"
)


def amount(value: Any) -> Decimal | None:
    """A decimal string (or Decimal) above 0 with at most 18 decimals, else None."""
    if isinstance(value, str) and not DECIMAL.fullmatch(value):
        return None
    if not isinstance(value, str | Decimal):
        return None
    try:
        parsed = Decimal(value)
    except InvalidOperation:
        return None
    if not parsed.is_finite() or parsed <= 0:
        return None
    exponent = parsed.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > MAX_DECIMALS:
        return None
    # numeric(38, 18): 20 digits before the point.
    if parsed >= Decimal(10) ** 20:
        return None
    return parsed


def shown(value: Decimal) -> str:
    """An amount as the API shows it: plain decimal notation, no trailing zeros."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def value_errors(document: dict[str, Any]) -> dict[str, list[str]]:
    """What schemas/agent.json lets through: an amount of zero, and amounts out of order."""
    policy = document.get(FIELD)
    if not isinstance(policy, dict):
        return {}
    errors: dict[str, list[str]] = {}
    parsed: dict[str, Decimal] = {}
    for name in AMOUNTS:
        if name not in policy:
            continue
        value = amount(policy[name])
        if value is None:
            errors[f"/{FIELD}/{name}"] = [
                f"a decimal string above 0 with at most {MAX_DECIMALS} decimals"
            ]
        else:
            parsed[name] = value
    pairs = (("approval_over", "max_per_transaction"), ("max_per_transaction", "max_per_day"))
    for low, high in pairs:
        if low in parsed and high in parsed and parsed[low] > parsed[high]:
            errors.setdefault(f"/{FIELD}/{low}", []).append(f"at most {high} ({policy[high]})")
    return errors


def check(document: dict[str, Any]) -> None:
    if errors := value_errors(document):
        raise ValidationFailed("the wallet_policy does not hold together", errors=errors, hint=HINT)


def tightened(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(pointer, reason) for each way `new` may refuse a transfer `old` allowed."""
    at = f"/{FIELD}"
    if old is None:
        return []
    if new is None:
        return [(at, "removed: every transfer is now refused")]
    found = []
    for name in ("max_per_transaction", "max_per_day"):
        if Decimal(new[name]) < Decimal(old[name]):
            found.append((f"{at}/{name}", f"lowered {old[name]} -> {new[name]}"))
    if new["currency"] != old["currency"]:
        found.append((f"{at}/currency", f"currency {old['currency']} -> {new['currency']}"))
    for chain in sorted(set(old["chains"]) - set(new["chains"])):
        found.append((f"{at}/chains", f"no longer allows chain {chain!r}"))
    if "recipients" in new:
        allowed = {address.lower() for address in new["recipients"]}
        before = old.get("recipients")
        if before is None:
            found.append((f"{at}/recipients", "recipients are now restricted"))
        elif any(address.lower() not in allowed for address in before):
            found.append((f"{at}/recipients", "no longer allows some recipients"))
    was, now = old.get("approval_over"), new.get("approval_over")
    if now is not None and (was is None or Decimal(now) < Decimal(was)):
        found.append((f"{at}/approval_over", f"more transfers wait for approval: {was} -> {now}"))
    return found


def require_admin(principal: Any) -> None:
    """Only an admin sets or changes a wallet_policy (create, a new version, a rollback to a
    version with another one): it bounds what the agent spends, as only an admin makes its
    wallet and answers its approvals."""
    principal.require("wallets:write")
