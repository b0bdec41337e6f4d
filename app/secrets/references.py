"""`{"$secret": "name"}` references inside an agent definition: where they may stand, the names
they use, their values substituted on the worker, and what a lower role sees of a definition.

References stand as any value inside `config`, and as the value of a command runtime's `env`
variable or an http runtime's header. No database here: the worker layer fetches the values.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from app.errors import json_pointer

KEY = "$secret"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
NAME = re.compile(NAME_PATTERN)
MASK = "***"
# Roles that see literal header and config values; the others see MASK.
ROLES_SEEING_VALUES = frozenset({"admin", "developer"})
# runtime type -> the field of its runtime whose values may be references.
RUNTIME_FIELDS = {"command": "env", "http": "headers"}


def is_reference(node: Any) -> bool:
    return isinstance(node, dict) and KEY in node


def _walk(node: Any, path: tuple) -> Iterator[tuple[tuple, Any]]:
    if is_reference(node):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, (*path, index))


def _runtime_field(runtime: Any) -> str | None:
    return RUNTIME_FIELDS.get(runtime.get("type")) if isinstance(runtime, dict) else None


def found(config: Any, runtime: Any) -> list[tuple[tuple, Any]]:
    """(path, reference) of every reference in a definition's config and runtime."""
    places = list(_walk(config, ("config",))) if isinstance(config, dict) else []
    field = _runtime_field(runtime)
    if field and isinstance(runtime.get(field), dict):
        places.extend(_walk(runtime[field], ("runtime", field)))
    return places


def form_errors(places: list[tuple[tuple, Any]]) -> dict[str, list[str]]:
    """A reference is exactly `{"$secret": "<name>"}`: what breaks that, by JSON pointer."""
    errors: dict[str, list[str]] = {}
    for path, node in places:
        name = node[KEY]
        if len(node) != 1 or not isinstance(name, str) or not NAME.match(name):
            errors[json_pointer(path)] = [
                'a secret reference is exactly {"$secret": "<name>"}, the name matching '
                + NAME_PATTERN
            ]
    return errors


def names(config: Any, runtime: Any) -> frozenset[str]:
    """The secret names a (valid) definition refers to."""
    return frozenset(node[KEY] for _, node in found(config, runtime))


def substituted(node: Any, values: dict[str, str]) -> Any:
    """A copy of `node` with each reference replaced by its secret's value."""
    if is_reference(node):
        return values[node[KEY]]
    if isinstance(node, dict):
        return {key: substituted(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [substituted(value, values) for value in node]
    return node


def _masked(node: Any) -> Any:
    if is_reference(node):
        return node
    if isinstance(node, dict):
        return {key: _masked(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_masked(value) for value in node]
    return MASK


def masked_for(role: str, definition: dict[str, Any]) -> dict[str, Any]:
    """The definition as `role` may see it: for operator and viewer, every literal value of
    `config` and of an http runtime's headers is MASK (references stay as they are)."""
    if role in ROLES_SEEING_VALUES:
        return definition
    shown = dict(definition)
    if isinstance(shown.get("config"), dict):
        shown["config"] = _masked(shown["config"])
    runtime = shown.get("runtime")
    if isinstance(runtime, dict) and isinstance(runtime.get("headers"), dict):
        shown["runtime"] = {**runtime, "headers": _masked(runtime["headers"])}
    return shown
