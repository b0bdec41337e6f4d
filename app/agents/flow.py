"""An agent's own flow control, as its definition states it: `concurrency` and `rate_limit`.

schemas/agent.json holds their rules; this module says the key rule plainly, gives the hint, and
brings a valid value to the one form versions store and compare (the gates that apply them read
it through VersionSpec: app/executions/spec.py).
"""

from __future__ import annotations

import math
import re
from typing import Any

from app.errors import ValidationFailed

FIELDS = ("concurrency", "rate_limit")
ON_LIMIT = ("queue", "cancel_running", "reject")
DEFAULT_ON_LIMIT = "queue"

KEY_MAX_LENGTH = 255
KEY_RULE = (
    'a string: "$.input" followed by one or more ".name" segments, names of letters, digits, '
    f'_ and - (e.g. "$.input.customer_id"), at most {KEY_MAX_LENGTH} characters'
)
# Matched whole: JSON Schema's `$` (run by Python's re) also lets a final newline through.
KEY = re.compile(r"\$\.input(\.[A-Za-z0-9_-]+)+")
HINT = (
    'concurrency is {"limit": 1..10000, "key"?: "$.input.<name>...", "on_limit"?: "queue" | '
    '"cancel_running" | "reject"}; rate_limit is {"limit": 1.., "period_seconds": above 0 up '
    'to 86400, "key"?: "$.input.<name>..."}; null removes one'
)


def value_errors(document: dict[str, Any]) -> dict[str, list[str]]:
    """What schemas/agent.json lets through: a key that is not a `$.input` reference as a
    whole, and a period of NaN (no comparison refuses it, and jsonb cannot store it)."""
    errors: dict[str, list[str]] = {}
    for field in FIELDS:
        value = document.get(field)
        if not isinstance(value, dict):
            continue
        key = value.get("key")
        if "key" in value and not (
            isinstance(key, str) and len(key) <= KEY_MAX_LENGTH and KEY.fullmatch(key)
        ):
            errors[f"/{field}/key"] = [f"must be {KEY_RULE}"]
        period = value.get("period_seconds")
        if isinstance(period, float) and math.isnan(period):
            errors[f"/{field}/period_seconds"] = ["must be a number above 0, at most 86400"]
    return errors


def explained(problem: ValidationFailed, document: dict[str, Any]) -> ValidationFailed:
    """The definition's problem, with the key rule said plainly (not as a regular expression)
    and a hint when a flow field is at fault."""
    errors = {**problem.errors, **value_errors(document)}
    if not any(pointer.startswith(("/concurrency", "/rate_limit")) for pointer in errors):
        return problem
    return ValidationFailed(problem.message, errors=errors, hint=problem.hint or HINT)


def normalized(field: str, value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A valid value as versions store it: `on_limit` spelled out, `key` only when given (a
    missing key is one group for the agent), whole numbers as integers."""
    if value is None:
        return None
    stored: dict[str, Any] = {"limit": int(value["limit"])}
    if field == "rate_limit":
        period = value["period_seconds"]
        stored["period_seconds"] = int(period) if float(period).is_integer() else float(period)
    if value.get("key") is not None:
        stored["key"] = value["key"]
    if field == "concurrency":
        stored["on_limit"] = value.get("on_limit", DEFAULT_ON_LIMIT)
    return stored
