"""JSON Schema checks: the product's own definitions, users' schemas, and instances against them.

Users' schemas are Draft 2020-12, checked against the metaschema, bounded in size and depth, and
may only reference themselves: no `$ref` is ever fetched from anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry
from referencing.exceptions import NoSuchResource
from referencing.jsonschema import DRAFT202012

from app.errors import ValidationFailed, json_pointer

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
REF_KEYWORDS = ("$ref", "$dynamicRef")


def _refuse_retrieval(uri: str) -> Any:
    raise NoSuchResource(ref=uri)


# Every validator gets this registry: an unknown reference fails, nothing is downloaded.
OFFLINE_REGISTRY: Registry = Registry(retrieve=_refuse_retrieval)


@cache
def product_schema(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS_DIR / f"{name}.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=OFFLINE_REGISTRY)


def _errors_by_pointer(errors: Iterable[ValidationError], prefix: str = "") -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for error in sorted(errors, key=lambda e: list(map(str, e.absolute_path))):
        # `if`/`then` wrappers report at the parent; their own sub-errors point at the field.
        leaves = _leaf_errors(error)
        for leaf in leaves:
            key = prefix + json_pointer(leaf.absolute_path)
            found.setdefault(key or "/", []).append(leaf.message)
    return found


def _leaf_errors(error: ValidationError) -> list[ValidationError]:
    if error.context:
        leaves: list[ValidationError] = []
        for sub in error.context:
            leaves.extend(_leaf_errors(sub))
        return leaves
    return [error]


def validate_definition(document: dict[str, Any], name: str = "agent") -> None:
    errors = _errors_by_pointer(product_schema(name).iter_errors(document))
    if errors:
        raise ValidationFailed(f"invalid {name} definition", errors=errors)


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping as soon as it passes `limit`."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    return deepest


def _refs(node: Any, path: tuple = ()) -> Iterable[tuple[tuple, str]]:
    """Every `$ref` / `$dynamicRef` in a schema, with the path to it."""
    if isinstance(node, dict):
        for key, child in node.items():
            if key in REF_KEYWORDS and isinstance(child, str):
                yield (*path, key), child
            else:
                yield from _refs(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _refs(child, (*path, index))


def check_user_schema(schema: Any, field: str, *, max_bytes: int, max_depth: int) -> None:
    """Refuse a user's JSON Schema that is invalid, too large, too deep or refers outside itself."""
    pointer = "/" + field
    if not isinstance(schema, dict):
        raise ValidationFailed(
            f"{field} must be a JSON Schema object", errors={pointer: ["must be an object"]}
        )
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > max_bytes:
        raise ValidationFailed(
            f"{field} is too large",
            errors={pointer: [f"{size} bytes; at most {max_bytes} (RUNYARD_SCHEMA_MAX_BYTES)"]},
        )
    if _depth(schema, max_depth) > max_depth:
        raise ValidationFailed(
            f"{field} is nested too deeply",
            errors={pointer: [f"deeper than {max_depth} levels (RUNYARD_SCHEMA_MAX_DEPTH)"]},
        )
    refs = list(_refs(schema))
    remote = [pointer + json_pointer(path) for path, ref in refs if not ref.startswith("#")]
    if remote:
        raise ValidationFailed(
            f"{field} refers to another document; only local references ('#/...') are allowed",
            errors={p: ["remote references are refused and never fetched"] for p in remote},
            hint="inline the referenced schema under $defs and refer to it as '#/$defs/<name>'",
        )
    metaschema_errors = _errors_by_pointer(
        Draft202012Validator(Draft202012Validator.META_SCHEMA).iter_errors(schema), prefix=pointer
    )
    if metaschema_errors:
        raise ValidationFailed(
            f"{field} is not a valid JSON Schema (Draft 2020-12)", errors=metaschema_errors
        )
    unresolvable = _unresolvable_refs(schema, refs, pointer)
    if unresolvable:
        raise ValidationFailed(
            f"{field} has a reference that does not resolve", errors=unresolvable
        )


def _unresolvable_refs(
    schema: dict[str, Any], refs: list[tuple[tuple, str]], pointer: str
) -> dict[str, list[str]]:
    resolver = OFFLINE_REGISTRY.resolver_with_root(DRAFT202012.create_resource(schema))
    problems: dict[str, list[str]] = {}
    for path, ref in refs:
        try:
            resolver.lookup(ref)
        except Exception:  # referencing raises several types for a bad pointer or anchor
            problems[pointer + json_pointer(path)] = [f"cannot resolve {ref!r}"]
    return problems


@lru_cache(maxsize=2048)
def _validator_for(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json), registry=OFFLINE_REGISTRY)


def validator_for(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for a user's (already checked) schema, cached by its canonical text."""
    return _validator_for(json.dumps(schema, sort_keys=True, separators=(",", ":")))


def instance_errors(
    validator: Draft202012Validator, instance: Any, prefix: str
) -> dict[str, list[str]]:
    return _errors_by_pointer(validator.iter_errors(instance), prefix=prefix)
