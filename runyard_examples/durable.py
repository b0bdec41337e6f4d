"""Example durable agents (README, "Durable agents"): each waits without holding a worker.

- `summarize-tickets` fans out to `summarize-ticket`, one child per ticket, and gathers them;
- `refund-approval` waits for a `refund.approved` event for its order, at most a day;
- `ticket-digest` keeps its cursor in state, so each run digests only what is new;
- `document-word-count` counts the words of the documents attached to its submit.
"""

from __future__ import annotations

from typing import Any

import runyard_client


@runyard_client.agent(
    "summarize-tickets",
    description="Summarizes many tickets at once: one summarize-ticket child each (durable)",
    input_schema={
        "type": "object",
        "required": ["tickets"],
        "properties": {
            "tickets": {
                "type": "array",
                "minItems": 1,
                "maxItems": 100,
                "items": {"type": "string", "minLength": 1},
            }
        },
    },
    output_schema={
        "type": "object",
        "required": ["summaries"],
        "properties": {"summaries": {"type": "array", "items": {"type": "string"}}},
    },
    timeout_seconds=60,
    tags=["support", "example", "durable"],
)
def summarize_tickets(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """Starts every child at once, then waits for them all, holding no worker meanwhile."""
    ids = [ctx.start("summarize-ticket", {"text": text}) for text in payload["tickets"]]
    return {"summaries": [output["summary"] for output in ctx.wait(ids)]}


@runyard_client.agent(
    "refund-approval",
    description="Quotes a refund, waits for refund.approved for the order (a day at most)",
    input_schema={
        "type": "object",
        "required": ["order_id", "amount"],
        "properties": {
            "order_id": {"type": "string", "minLength": 1},
            "amount": {"type": "number", "exclusiveMinimum": 0},
            "timeout_seconds": {"type": "integer", "minimum": 1, "maximum": 86400},
        },
    },
    output_schema={
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"enum": ["approved", "expired"]},
            "approved_by": {"type": ["string", "null"]},
            "quote": {"type": "object"},
        },
    },
    timeout_seconds=30,
    tags=["finance", "example", "durable"],
)
def refund_approval(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """POST /api/v1/events {"name": "refund.approved", "data": {"order_id": ..., "by": ...}}
    resumes it; without one it ends `expired` after timeout_seconds."""
    quote = ctx.step("quote", _quote, payload["order_id"], payload["amount"])
    approval = ctx.wait_for_event(
        "refund.approved",
        match={"order_id": payload["order_id"]},
        timeout_seconds=payload.get("timeout_seconds", 86400),
        lookback_seconds=60,
    )
    if approval is None:
        return {"status": "expired", "approved_by": None, "quote": quote}
    return {"status": "approved", "approved_by": approval.get("by"), "quote": quote}


def _quote(order_id: str, amount: float) -> dict[str, Any]:
    return {"order_id": order_id, "refund": round(amount, 2)}


@runyard_client.agent(
    "ticket-digest",
    description="Digests the tickets newer than its cursor, kept in the agent's state",
    input_schema={
        "type": "object",
        "required": ["tickets"],
        "properties": {
            "tickets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "text"],
                    "properties": {"id": {"type": "integer"}, "text": {"type": "string"}},
                },
            }
        },
    },
    output_schema={
        "type": "object",
        "required": ["new", "cursor"],
        "properties": {"new": {"type": "integer"}, "cursor": {"type": "integer"}},
    },
    timeout_seconds=30,
    tags=["support", "example", "durable"],
)
def ticket_digest(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """Run it daily from a schedule: each run counts only the tickets past the last run's."""
    cursor = ctx.state.get("cursor", 0)
    new = [ticket for ticket in payload["tickets"] if ticket["id"] > cursor]
    if new:
        cursor = max(ticket["id"] for ticket in new)
        ctx.state.set("cursor", cursor)
    ctx.log.info("digest", new=len(new), cursor=cursor)
    return {"new": len(new), "cursor": cursor}


@runyard_client.agent(
    "document-word-count",
    description='Words in each document attached to the submit ("documents": [ids])',
    input_schema={"type": "object", "properties": {"top": {"type": "integer", "minimum": 1}}},
    output_schema={
        "type": "object",
        "required": ["documents"],
        "properties": {
            "documents": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "words"],
                    "properties": {"name": {"type": "string"}, "words": {"type": "integer"}},
                },
            }
        },
    },
    timeout_seconds=60,
    tags=["documents", "example"],
)
def document_word_count(payload: dict[str, Any], ctx) -> dict[str, Any]:
    """Reads each attached document as text (ctx.document(id).text()) and counts its words."""
    counted = []
    for document in ctx.documents:
        text = ctx.document(document["id"]).text()
        counted.append({"name": document["name"], "words": len(text.split())})
    return {"documents": counted}
