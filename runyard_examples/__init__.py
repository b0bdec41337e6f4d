"""Example agents that `runyard up` loads into the `default` organization: the `script` agents
below, and the `python` agents of runyard_examples.text, runyard_examples.durable (durable
agents: children, event waits, state) and runyard_examples.payments, which declare themselves with
`@runyard_client.agent`. examples/agents/ holds all of them as manifests
(`runyard agents apply -f examples/agents`)."""

from __future__ import annotations

from typing import Any

from runyard_client import discover

SLUGIFY_SOURCE = '''\
import re
import unicodedata


def main(input, ctx):
    """Turns a title into a URL slug."""
    text = unicodedata.normalize("NFKD", input["title"]).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    ctx.log.info("slugified", length=len(slug))
    return {"slug": slug[: ctx.config.get("max_length", 80)]}
'''

INVOICE_SOURCE = '''\
def main(input, ctx):
    """Totals invoice lines with a tax rate; refuses negative quantities."""
    subtotal = 0.0
    for number, line in enumerate(input["lines"], start=1):
        if line["quantity"] < 0:
            raise ValueError(f"line {number}: negative quantity")
        amount = round(line["quantity"] * line["unit_price"], 2)
        print(f"line {number}: {line['quantity']} x {line['unit_price']} = {amount}")
        subtotal += amount
    tax = round(subtotal * input.get("tax_rate", 0), 2)
    return {"subtotal": round(subtotal, 2), "tax": tax, "total": round(subtotal + tax, 2)}
'''

SCRIPT_AGENTS: list[dict[str, Any]] = [
    {
        "name": "slugify",
        "description": "URL slug of a title (a script agent: runs in a child process)",
        "runtime": {"type": "script", "language": "python", "source": SLUGIFY_SOURCE},
        "input_schema": {
            "type": "object",
            "required": ["title"],
            "properties": {"title": {"type": "string"}},
        },
        "output_schema": {
            "type": "object",
            "required": ["slug"],
            "properties": {"slug": {"type": "string", "pattern": "^[a-z0-9-]*$"}},
        },
        "timeout_seconds": 30,
        "tags": ["web", "example"],
        "config": {"max_length": 80},
    },
    {
        "name": "invoice-total",
        "description": "Subtotal, tax and total of invoice lines (a script agent)",
        "runtime": {"type": "script", "language": "python", "source": INVOICE_SOURCE},
        "input_schema": {
            "type": "object",
            "required": ["lines"],
            "properties": {
                "tax_rate": {"type": "number", "minimum": 0, "maximum": 1},
                "lines": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["quantity", "unit_price"],
                        "properties": {
                            "quantity": {"type": "number"},
                            "unit_price": {"type": "number", "minimum": 0},
                        },
                    },
                },
            },
        },
        "output_schema": {
            "type": "object",
            "required": ["subtotal", "tax", "total"],
            "properties": {
                "subtotal": {"type": "number"},
                "tax": {"type": "number"},
                "total": {"type": "number"},
            },
        },
        "timeout_seconds": 30,
        "tags": ["finance", "example"],
    },
]

# Everything `runyard up` loads: the python agents as they declare themselves, then the scripts.
AGENTS: list[dict[str, Any]] = [
    *discover("runyard_examples.text", "runyard_examples.durable", "runyard_examples.payments"),
    *SCRIPT_AGENTS,
]
