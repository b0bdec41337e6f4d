"""What changed between two versions of a definition, and which changes break its callers.

The changes are RFC 6902 operations made by `jsonpatch` (they turn the older definition into the
newer). The breaking ones are found by walking both definitions: an input schema that refuses
something the older one accepted, an output schema that no longer promises what the older one
did, and limits that cut runs short. The walk follows `type`, `enum`/`const`, `required`,
`properties`, `additionalProperties`/`unevaluatedProperties`, `items` and the numeric, length
and count bounds; a change to a keyword it does not reason about (`$ref`, `allOf`, `anyOf`,
`oneOf`, `if`, ...) is named as breaking, since it cannot tell (BREAKING_RULES, in the OpenAPI
description of the diff routes, lists them all).
"""

from __future__ import annotations

from typing import Any

import jsonpatch

from app.agents import capabilities, wallet_policy
from app.errors import json_pointer

BREAKING_RULES = (
    "`breaking` names each change that can fail a caller who relied on the older version: "
    "an input schema that newly requires a field, drops an accepted property (when other "
    "properties are refused), starts refusing unlisted properties, narrows a `type`, `enum` or "
    "`const`, raises a `minimum`/`minLength`/`minItems`/`minProperties`, lowers a "
    "`maximum`/`maxLength`/`maxItems`/`maxProperties`, or adds or changes a `pattern`, "
    "`format` or `multipleOf`; an output schema that drops a property or a required field, or "
    "widens a `type`, `enum`, `const` or bound; a change to a schema keyword the check does not "
    "reason about (`$ref`, `$defs`, `allOf`, `anyOf`, `oneOf`, `not`, `if`/`then`/`else`, "
    "`patternProperties`, `prefixItems`, ...); for agents also a runtime `type` change, a "
    "lower `timeout_seconds`, a lower `limits` value (memory_mb, cpu_seconds, "
    "max_output_bytes, max_log_lines), fewer `retry.max_retries`, a capability removed, and a "
    "`wallet_policy` removed or tightened (a lower `max_per_transaction` or `max_per_day`, "
    "another `currency`, a chain dropped, `recipients` added or narrowed, a new or lower "
    "`approval_over`); a loosened policy is not breaking (see `changes`)"
)

LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")
EXACT = ("pattern", "format", "multipleOf")
CLOSERS = ("additionalProperties", "unevaluatedProperties")
WALKED = {
    "type",
    "enum",
    "const",
    "required",
    "properties",
    "items",
    "title",
    "description",
    "examples",
    "default",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "uniqueItems",
    *LOWER_BOUNDS,
    *UPPER_BOUNDS,
    *EXACT,
    *CLOSERS,
}
LIMITS = ("memory_mb", "cpu_seconds", "max_output_bytes", "max_log_lines")

Break = dict[str, str]


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """RFC 6902 operations that turn `old` into `new`."""
    return list(jsonpatch.make_patch(old, new).patch)


def _schema(value: Any) -> dict[str, Any]:
    """A boolean schema as the object schema that means the same."""
    if value is True:
        return {}
    if value is False:
        return {"not": {}}
    return value if isinstance(value, dict) else {}


def _types(schema: dict[str, Any]) -> set[str] | None:
    """The JSON types a schema allows (None: any), `integer` counted inside `number`."""
    declared = schema.get("type")
    if declared is None:
        return None
    found = {declared} if isinstance(declared, str) else set(declared)
    if "number" in found:
        found.add("integer")
    return found


def _values(schema: dict[str, Any]) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    enum = schema.get("enum")
    return list(enum) if isinstance(enum, list) else None


def _tighter(keyword: str, wide: Any, narrow: Any) -> bool:
    """Whether bound `narrow` allows less than bound `wide` (None: no bound)."""
    if not isinstance(narrow, int | float) or isinstance(narrow, bool):
        return False
    if not isinstance(wide, int | float) or isinstance(wide, bool):
        return True
    return narrow > wide if keyword in LOWER_BOUNDS else narrow < wide


def _closed(schema: dict[str, Any]) -> bool:
    return any(schema.get(keyword) is False for keyword in CLOSERS)


def _narrowed(
    wide: dict[str, Any], narrow: dict[str, Any], at: list[Any], output: bool
) -> list[Break]:
    """What `narrow` allows less of than `wide`, as far as type, values and bounds go. For an
    input schema the new one is `narrow` (it refuses more); for an output schema the old one is
    (the new one may produce more). Reasons read from the old version to the new."""
    breaks: list[Break] = []
    old, new = (narrow, wide) if output else (wide, narrow)
    wide_types, narrow_types = _types(wide), _types(narrow)
    if narrow_types is not None and (wide_types is None or not wide_types <= narrow_types):
        gone = "any type" if wide_types is None else ", ".join(sorted(wide_types - narrow_types))
        reason = f"may now be {gone}" if output else f"no longer allows {gone}"
        breaks.append(_break([*at, "type"], reason))
    wide_values, narrow_values = _values(wide), _values(narrow)
    if narrow_values is not None and (
        wide_values is None or any(value not in narrow_values for value in wide_values)
    ):
        keyword = "const" if "const" in narrow else "enum"
        reason = "may now be other values" if output else "allows fewer values"
        breaks.append(_break([*at, keyword], reason))
    for keyword in (*LOWER_BOUNDS, *UPPER_BOUNDS):
        if _tighter(keyword, wide.get(keyword), narrow.get(keyword)):
            breaks.append(
                _break([*at, keyword], f"{keyword} {old.get(keyword)} -> {new.get(keyword)}")
            )
    for keyword in EXACT:
        if keyword in narrow and narrow[keyword] != wide.get(keyword):
            reason = (
                f"{keyword} {narrow[keyword]!r} is no longer promised"
                if output
                else f"{keyword} is now {narrow[keyword]!r}"
            )
            breaks.append(_break([*at, keyword], reason))
    if narrow.get("uniqueItems") is True and wide.get("uniqueItems") is not True:
        reason = "items may now repeat" if output else "items must now be unique"
        breaks.append(_break([*at, "uniqueItems"], reason))
    return breaks


def _unwalked(old: dict[str, Any], new: dict[str, Any], at: list[Any]) -> list[Break]:
    return [
        _break([*at, keyword], f"{keyword} changed: not analyzed, so counted as breaking")
        for keyword in sorted((set(old) | set(new)) - WALKED)
        if old.get(keyword) != new.get(keyword)
    ]


def input_breaks(old_value: Any, new_value: Any, at: list[Any]) -> list[Break]:
    """Where the new input schema refuses a value the old one accepted."""
    old, new = _schema(old_value), _schema(new_value)
    breaks = _narrowed(old, new, at, output=False) + _unwalked(old, new, at)
    for name in sorted(set(new.get("required", [])) - set(old.get("required", []))):
        breaks.append(_break([*at, "required"], f"newly requires {name!r}"))
    for keyword in CLOSERS:
        if new.get(keyword) is False and old.get(keyword) is not False:
            breaks.append(_break([*at, keyword], "refuses properties it does not list"))
    old_properties, new_properties = old.get("properties", {}), new.get("properties", {})
    for name, schema in old_properties.items():
        if name in new_properties:
            breaks += input_breaks(schema, new_properties[name], [*at, "properties", name])
        elif _closed(new):
            breaks.append(_break([*at, "properties", name], f"no longer accepts {name!r}"))
    if "items" in old or "items" in new:
        breaks += input_breaks(old.get("items", True), new.get("items", True), [*at, "items"])
    return breaks


def output_breaks(old_value: Any, new_value: Any, at: list[Any]) -> list[Break]:
    """Where the new output schema no longer promises what the old one did."""
    old, new = _schema(old_value), _schema(new_value)
    breaks = _narrowed(new, old, at, output=True) + _unwalked(old, new, at)
    for name in sorted(set(old.get("required", [])) - set(new.get("required", []))):
        breaks.append(_break([*at, "required"], f"{name!r} is no longer required"))
    old_properties, new_properties = old.get("properties", {}), new.get("properties", {})
    for name, schema in old_properties.items():
        if name in new_properties:
            breaks += output_breaks(schema, new_properties[name], [*at, "properties", name])
        else:
            breaks.append(_break([*at, "properties", name], f"drops {name!r}"))
    if "items" in old or "items" in new:
        breaks += output_breaks(old.get("items", True), new.get("items", True), [*at, "items"])
    return breaks


def agent_breaks(old: dict[str, Any], new: dict[str, Any]) -> list[Break]:
    """The breaking changes from agent definition `old` to `new` (their versioned fields)."""
    breaks = input_breaks(old["input_schema"], new["input_schema"], ["input_schema"])
    breaks += output_breaks(old["output_schema"], new["output_schema"], ["output_schema"])
    old_type, new_type = old["runtime"].get("type"), new["runtime"].get("type")
    if old_type != new_type:
        breaks.append(_break(["runtime", "type"], f"runtime {old_type} -> {new_type}"))
    if new["timeout_seconds"] < old["timeout_seconds"]:
        breaks.append(
            _break(
                ["timeout_seconds"],
                f"lowered {old['timeout_seconds']} -> {new['timeout_seconds']}: longer runs "
                "now time out",
            )
        )
    for name in LIMITS:
        was, now = old["limits"].get(name), new["limits"].get(name)
        # An absent limit is the installation's default, which this cannot compare.
        if was is not None and _tighter("maximum", was, now):
            breaks.append(_break(["limits", name], f"lowered {was} -> {now}"))
    was, now = old["retry"].get("max_retries", 0), new["retry"].get("max_retries", 0)
    if now < was:
        breaks.append(_break(["retry", "max_retries"], f"fewer retries: {was} -> {now}"))
    for reason in capabilities.removed(old["capabilities"], new["capabilities"]):
        breaks.append(_break(["capabilities"], reason))
    for pointer, reason in wallet_policy.tightened(
        old.get("wallet_policy"), new.get("wallet_policy")
    ):
        breaks.append({"path": pointer, "reason": reason})
    return breaks


def chain_breaks(old: dict[str, Any], new: dict[str, Any]) -> list[Break]:
    """The breaking changes from chain definition `old` to `new`: its input schema's."""
    return input_breaks(old["input_schema"], new["input_schema"], ["input_schema"])


def _break(path: list[Any], reason: str) -> Break:
    return {"path": json_pointer(path), "reason": reason}
