r"""JSON Schema checks: the product's own definitions, users' schemas, and instances against them.

Users' schemas are Draft 2020-12, checked against the metaschema, bounded in size and depth, and
may only reference themselves: no `$ref` is ever fetched from anywhere.

Their regular expressions (`pattern`, `patternProperties`) run on RE2, which matches in time linear
in the text, never on Python's backtracking `re`: a pattern like `^(a+)+$` must not let one request
(or one output check in a worker) spin a CPU for minutes. RE2 has no backreferences and no
lookaround, so a schema using them is refused at creation. Other differences from ECMA-262 (the
dialect JSON Schema names): `\s` is `[\t\n\f\r ]` only, `.` matches `\r`, U+2028 and U+2029,
repetition counts stop at 1000, and the text is matched by code point, not UTF-16 unit. `\uXXXX`
escapes are accepted (rewritten to RE2's `\x{XXXX}`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from functools import cache, lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import re2
from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator
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


_RE2_OPTIONS = re2.Options()
# A refused pattern is the client's 422, not a line on the server's stderr.
_RE2_OPTIONS.log_errors = False
# `\uXXXX` not preceded by another backslash (an even run of backslashes is escaped backslashes).
_ECMA_UNICODE_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u([0-9A-Fa-f]{4})")


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Any:
    """A user's pattern compiled by RE2; raises `re2.error` for one RE2 cannot run."""
    return re2.compile(_ECMA_UNICODE_ESCAPE.sub(r"\1\\x{\2}", pattern), _RE2_OPTIONS)


def _matches(pattern: str, text: str) -> bool:
    return compile_pattern(pattern).search(text) is not None


# jsonschema calls `re.search` for these three keywords and offers no way to swap the engine, so
# users' validators replace them. `unevaluatedProperties` matches `patternProperties` through
# `re` as well and cannot be replaced as simply: check_user_schema refuses the two together.
def _unrunnable(patterns: Iterable[str]) -> ValidationError | None:
    """A backstop: check_user_schema refuses such patterns at creation, so this is only for
    one it could not see; the submit then answers 422, never a 500 from RE2."""
    for pattern in patterns:
        try:
            compile_pattern(pattern)
        except re2.error:
            return ValidationError(f"the schema's pattern {pattern!r} cannot run here (RE2)")
    return None


def _pattern(validator, pattern, instance, schema):
    if not validator.is_type(instance, "string"):
        return
    if (refused := _unrunnable([pattern])) is not None:
        yield refused
    elif not _matches(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator, pattern_properties, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    if (refused := _unrunnable(pattern_properties)) is not None:
        yield refused
        return
    for pattern, subschema in pattern_properties.items():
        for key, value in instance.items():
            if _matches(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator, additional, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    if (refused := _unrunnable(patterns)) is not None:
        yield refused
        return
    extras = [
        key
        for key in instance
        if key not in properties and not any(_matches(pattern, key) for pattern in patterns)
    ]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif additional is False and extras:
        unexpected = ", ".join(repr(extra) for extra in sorted(extras))
        yield ValidationError(f"Additional properties are not allowed ({unexpected} unexpected)")


UserSchemaValidator = validators.extend(
    Draft202012Validator,
    {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
    },
)

_RE2_FORMAT = FormatChecker(formats=())
_RE2_FORMAT.checks("regex", raises=re2.error)(lambda pattern: bool(compile_pattern(pattern)))
# The metaschema marks every `pattern` and `patternProperties` key `format: regex`: asserting that
# one format finds each pattern of a schema, with its place, and nothing that only looks like one.
_PATTERN_FINDER = Draft202012Validator(Draft202012Validator.META_SCHEMA, format_checker=_RE2_FORMAT)


def _pattern_problems(schema: dict[str, Any], pointer: str, refs) -> dict[str, list[str]]:
    problems: dict[str, list[str]] = {}
    for path, subschema in [((), schema), *_ref_targets(schema, refs)]:
        for error in _PATTERN_FINDER.iter_errors(subschema):
            if error.validator != "format":
                continue
            reason = error.cause.args[0] if error.cause and error.cause.args else "refused"
            if isinstance(reason, bytes):
                reason = reason.decode(errors="replace")
            found = problems.setdefault(pointer + json_pointer((*path, *error.absolute_path)), [])
            message = f"{error.instance!r} is not a pattern this server runs (RE2): {reason}"
            if message not in found:  # a target inside the schema's keywords is found twice
                found.append(message)
    return problems


# Draft 2020-12 keywords whose value is a subschema, a list of subschemas, or a map of names to
# subschemas (with the older `definitions` and `dependencies`, which the metaschema still
# validates as such). Everything else is a keyword's plain value: a property name, a `const`.
SUBSCHEMA_KEYWORDS = (
    "additionalProperties",
    "propertyNames",
    "items",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contentSchema",
)
SUBSCHEMA_LIST_KEYWORDS = ("allOf", "anyOf", "oneOf", "prefixItems")
SUBSCHEMA_MAP_KEYWORDS = (
    "properties",
    "patternProperties",
    "$defs",
    "definitions",
    "dependentSchemas",
    "dependencies",
)


def _keywords(schemas: Iterable[Any]) -> set[str]:
    """The keywords the schemas and their subschemas use: not the names under `properties`,
    nor the keys of a `const`, `enum` or `default` value."""
    used: set[str] = set()
    for node in _subschemas(schemas):
        used.update(node)
    return used


def _subschemas(schemas: Iterable[Any], *skip: Any) -> Iterator[dict[str, Any]]:
    """Every object schema among `schemas` and their subschemas, walked by keyword (those in
    `skip`, by identity, are walked but not yielded)."""
    stack = list(schemas)
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):  # a boolean schema, or `dependencies`' list of names
            continue
        if not any(node is skipped for skipped in skip):
            yield node
        stack.extend(node[keyword] for keyword in SUBSCHEMA_KEYWORDS if keyword in node)
        for keyword in SUBSCHEMA_LIST_KEYWORDS:
            if isinstance(node.get(keyword), list):
                stack.extend(node[keyword])
        for keyword in SUBSCHEMA_MAP_KEYWORDS:
            if isinstance(node.get(keyword), dict):
                stack.extend(node[keyword].values())


def _ref_targets(schema: dict[str, Any], refs: list[tuple[tuple, str]]) -> list[tuple[tuple, Any]]:
    """Path and value of what each `#/...` reference points at (all resolve by now). A
    reference may point anywhere in the document, also under a key that is no keyword, and
    what it points at is then evaluated as a schema: it is checked as one. (An anchor is only
    found in a subschema, so `#name` needs no such care.)"""
    targets: list[tuple[tuple, Any]] = []
    for _path, ref in refs:
        if not ref.startswith("#/"):
            continue
        node: Any = schema
        path: list[str | int] = []
        # A URI fragment: percent-decoded first, then read as a JSON pointer (as `referencing`
        # resolves it, so `a%2Fb` is the two steps `a`, `b`).
        try:
            for part in unquote(ref[2:]).split("/"):
                token = part.replace("~1", "/").replace("~0", "~")
                step: str | int = int(token) if isinstance(node, list) else token
                node = node[step]
                path.append(step)
        except (LookupError, TypeError, ValueError):
            continue  # refused as unresolvable before this is reached
        targets.append((tuple(path), node))
    return targets


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
    targets = [target for _path, target in _ref_targets(schema, refs)]
    if any("$id" in subschema for subschema in _subschemas([schema, *targets], schema)):
        # An embedded $id changes what `#/...` means below it, and with it what these checks
        # would have to look at.
        raise ValidationFailed(
            f"{field} has an $id below its root",
            errors={pointer: ["$id is allowed on the root schema only"]},
            hint="drop the inner $id and refer to the subschema as '#/$defs/<name>'",
        )
    bad_patterns = _pattern_problems(schema, pointer, refs)
    if bad_patterns:
        raise ValidationFailed(
            f"{field} has a pattern that cannot run here",
            errors=bad_patterns,
            hint="patterns run on RE2 (linear time): no backreferences, no lookahead or "
            "lookbehind, repetition counts up to 1000",
        )
    used = _keywords([schema, *targets])
    if {"unevaluatedProperties", "patternProperties"} <= used:
        raise ValidationFailed(
            f"{field} combines unevaluatedProperties with patternProperties",
            errors={pointer: ["unevaluatedProperties cannot be used with patternProperties"]},
            hint="next to patternProperties, use additionalProperties instead",
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
def _validator_for(schema_json: str) -> Validator:
    return UserSchemaValidator(json.loads(schema_json), registry=OFFLINE_REGISTRY)


def validator_for(schema: dict[str, Any]) -> Validator:
    """A validator for a user's (already checked) schema, cached by its canonical text."""
    return _validator_for(json.dumps(schema, sort_keys=True, separators=(",", ":")))


def instance_errors(validator: Validator, instance: Any, prefix: str) -> dict[str, list[str]]:
    return _errors_by_pointer(validator.iter_errors(instance), prefix=prefix)
