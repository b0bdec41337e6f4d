"""`$.event...` references in a trigger's input: a string value starting with `$.` names a part
of the event (a webhook's delivered JSON body; an event trigger's event, see on_event.py) and is
replaced by it when the trigger starts its target."""

from __future__ import annotations

import re
from typing import Any

from app.errors import ValidationFailed, json_pointer

_SEGMENT = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]")


def _parse_reference(reference: str) -> list[str | int]:
    """`$.event.a.b[0]` -> ["a", "b", 0]; ValueError for anything else."""
    if not (reference == "$.event" or reference.startswith(("$.event.", "$.event["))):
        raise ValueError("references start with $.event")
    rest = reference[len("$.event") :]
    path: list[str | int] = []
    position = 0
    while position < len(rest):
        match = _SEGMENT.match(rest, position)
        if match is None:
            raise ValueError(f"cannot read {rest[position:]!r}: use .key or [index]")
        path.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        position = match.end()
    return path


def _references(template: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    if isinstance(template, str) and template.startswith("$."):
        return [(path, template)]
    if isinstance(template, dict):
        return [ref for key, value in template.items() for ref in _references(value, (*path, key))]
    if isinstance(template, list):
        return [ref for i, value in enumerate(template) for ref in _references(value, (*path, i))]
    return []


def check_template(template: dict[str, Any]) -> bool:
    """422 for a malformed reference; True when the template has references at all."""
    errors: dict[str, list[str]] = {}
    found = _references(template)
    for path, reference in found:
        try:
            _parse_reference(reference)
        except ValueError as exc:
            errors[json_pointer(("input", *path))] = [f"{reference!r}: {exc}"]
    if errors:
        raise ValidationFailed(
            "the input holds malformed references",
            errors=errors,
            hint="a string starting with $. reads the delivered body, e.g. $.event.ticket.id",
        )
    return bool(found)


def render(template: Any, event: Any) -> Any:
    """The input for one delivery: every reference replaced by what it names in the event."""
    errors: dict[str, list[str]] = {}

    def walk(node: Any, path: tuple) -> Any:
        if isinstance(node, str) and node.startswith("$."):
            value = event
            for segment in _parse_reference(node):
                try:
                    value = value[segment]
                except (KeyError, IndexError, TypeError):
                    errors[json_pointer(("input", *path))] = [
                        f"{node}: the event has nothing at {segment!r}"
                    ]
                    return None
            return value
        if isinstance(node, dict):
            return {key: walk(value, (*path, key)) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value, (*path, i)) for i, value in enumerate(node)]
        return node

    rendered = walk(template, ())
    if errors:
        raise ValidationFailed(
            "the delivered event lacks what the trigger's input references",
            errors=errors,
            hint="GET /api/v1/triggers/{id} shows the input and its references",
        )
    return rendered


def references_in(template: Any) -> list[tuple[str, str, list[str | int]]]:
    """(JSON pointer, reference, parsed path) of each well-formed reference of a template."""
    found = []
    for path, reference in _references(template):
        try:
            found.append((json_pointer(("input", *path)), reference, _parse_reference(reference)))
        except ValueError:
            continue
    return found
