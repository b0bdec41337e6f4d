"""The run form an agent's page draws from its input JSON Schema, and the reading of it back.

Top-level properties of an object schema each get a field (text, number, checkbox, a choice for
an enum, JSON for the rest); any other schema gets one JSON field. The input is then validated by
the submit itself, whose 422 errors (JSON pointers under /input) are shown next to their fields."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

WHOLE_INPUT = "__input__"
_REQUIRED = re.compile(r"'(?P<name>[^']+)' is a required property")


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # text, integer, number, boolean, choice, json
    required: bool
    description: str
    choices: tuple[Any, ...] = ()
    default: Any = None


def fields_of(schema: Mapping[str, Any] | None) -> list[Field]:
    schema = schema or {}
    properties = schema.get("properties")
    if schema.get("type") != "object" or not isinstance(properties, Mapping):
        return [Field(WHOLE_INPUT, "json", True, "the whole input, as JSON")]
    required = set(schema.get("required") or ())
    found: list[Field] = []
    for name, spec in properties.items():
        spec = spec if isinstance(spec, Mapping) else {}
        kind = {"string": "text", "integer": "integer", "number": "number", "boolean": "boolean"}
        found.append(
            Field(
                name,
                "choice" if "enum" in spec else kind.get(spec.get("type"), "json"),
                name in required,
                str(spec.get("description", "")),
                tuple(spec.get("enum") or ()),
                spec.get("default"),
            )
        )
    # JSONB keeps no key order: the required fields first, then by name.
    return sorted(found, key=lambda field: (not field.required, field.name))


def read(fields: list[Field], form: Mapping[str, str]) -> tuple[Any, dict[str, list[str]]]:
    """The input the form describes, and the fields that could not even be read (bad JSON).
    A wrong type is left for the schema to refuse, with its own message."""
    problems: dict[str, list[str]] = {}
    if fields and fields[0].name == WHOLE_INPUT:
        try:
            return json.loads(form.get(WHOLE_INPUT) or "{}"), problems
        except ValueError as exc:
            return None, {WHOLE_INPUT: [f"not JSON: {exc}"]}
    payload: dict[str, Any] = {}
    for field in fields:
        raw = form.get(field.name, "")
        if field.kind == "boolean":
            payload[field.name] = raw == "on"
            continue
        if raw == "":
            continue  # left empty: absent (a required one is refused by the schema)
        payload[field.name] = _value(field, raw, problems)
    return payload, problems


def _value(field: Field, raw: str, problems: dict[str, list[str]]) -> Any:
    try:
        if field.kind == "integer":
            return int(raw)
        if field.kind == "number":
            return float(raw)
        if field.kind == "json":
            return json.loads(raw)
        if field.kind == "choice":
            return next((c for c in field.choices if str(c) == raw), raw)
    except ValueError:
        if field.kind == "json":
            problems[field.name] = ["not JSON"]
        return raw  # the schema says what is wrong with it
    return raw


def errors_by_field(errors: Mapping[str, Any]) -> dict[str, list[str]]:
    """A submit's 422 errors ("/input/name/...": [...]) by form field; the rest under ""."""
    by_field: dict[str, list[str]] = {}
    for pointer, problems in errors.items():
        problems = problems if isinstance(problems, list) else [str(problems)]
        parts = pointer.split("/")
        if len(parts) >= 3 and parts[1] == "input":
            name = parts[2].replace("~1", "/").replace("~0", "~")
            by_field.setdefault(name, []).extend(str(p) for p in problems)
            continue
        for problem in problems:
            match = _REQUIRED.search(str(problem))
            by_field.setdefault(match["name"] if match else "", []).append(str(problem))
    return by_field
