"""The rules of schemas/*.json as OpenAPI 3.0 schema objects, for the marshmallow fields whose
deeper rules live there (an agent's runtime, retry and limits, a chain's steps): the OpenAPI
document states what the server checks, from the one place each rule is written.

OpenAPI 3.0 schemas are a dialect of JSON Schema older than the Draft 2020-12 the files use,
so a part is rewritten: `const` becomes a one-value `enum`, a `null` type `nullable`, a numeric
`exclusiveMinimum` the 3.0 boolean form, `$defs` references are inlined, and the `if`/`then`
choices become a `oneOf` (the files use them only for alternatives that exclude each other: a
runtime's `type`, a chain step with or without `parallel`). `propertyNames` has no 3.0 form:
its pattern goes into the description instead.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from app.jsonschemas import SCHEMAS_DIR

DROPPED = {"$schema", "$id", "$defs", "title"}
# Python's `\s` (the server matches patterns with `re`), spelled out: ECMA-262's (the dialect
# of OpenAPI patterns, what clients match with) differs on U+001C..U+001F, U+0085 and U+FEFF.
SPACE = r"\t\n\v\f\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@cache
def _document(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS_DIR / f"{name}.json").read_text())


def rule(document: str, prop: str, **extra: Any) -> dict[str, Any]:
    """Field metadata: property `prop` of schemas/<document>.json in OpenAPI 3.0 terms, with
    `extra` (a description, say) on top. apispec copies such metadata into the document."""
    schema = _document(document)
    converted = _convert(schema["properties"][prop], schema.get("$defs", {}))
    if "description" in extra and "description" in converted:
        extra = {**extra, "description": f"{extra['description']}. {converted['description']}"}
    return {**converted, **extra}


def item_rule(document: str, prop: str) -> dict[str, Any]:
    """Metadata for the inner field of a List: apispec writes a List's `items` from it."""
    return rule(document, prop)["items"]


def _convert(node: Any, defs: dict[str, Any]) -> Any:
    if node is True:
        return {}
    if not isinstance(node, dict):
        return node
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is not None:
        node = {**defs[ref.removeprefix("#/$defs/")], **node}
    out: dict[str, Any] = {}
    alternatives = _alternatives(node)
    if alternatives is not None:
        out["oneOf"] = [_convert(alternative, defs) for alternative in alternatives]
        node = {key: value for key, value in node.items() if key not in ("allOf", "properties")}
        node.pop("required", None)
    for key, value in node.items():
        if key in DROPPED or key in ("if", "then", "else", "description", "propertyNames"):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "type" and isinstance(value, list):
            kinds = [kind for kind in value if kind != "null"]
            if "null" in value:
                out["nullable"] = True
            if len(kinds) == 1:
                out["type"] = kinds[0]
            else:
                out["oneOf"] = [{"type": kind} for kind in kinds]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "pattern":
            out[key] = _spaces_spelled_out(value)
        elif key == "properties":
            out[key] = {name: _convert(child, defs) for name, child in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _convert(value, defs)
        elif key in ("allOf", "oneOf", "anyOf"):
            out[key] = [_convert(child, defs) for child in value]
        else:
            out[key] = value
    description = node.get("description", "")
    if "propertyNames" in node:
        pattern = node["propertyNames"]["pattern"]
        description = f"{description} Property names match `{pattern}`.".strip()
    if description:
        out["description"] = description
    return out


def _alternatives(node: dict[str, Any]) -> list[Any] | None:
    """The schemas an `if`/`then` choice stands for, as `oneOf` members: `if A then B else C`
    is B or C; an `allOf` of `if`/`then` pairs alone (one per value of a discriminating
    property) is one of the `then`s."""
    if "if" in node and "then" in node and "else" in node:
        return [node["then"], node["else"]]
    choices = node.get("allOf")
    if choices and all(set(choice) == {"if", "then"} for choice in choices):
        return [choice["then"] for choice in choices]
    return None


def _spaces_spelled_out(pattern: str) -> str:
    """`pattern` with `\\s` and `\\S` written as the classes Python means by them."""
    out, in_class, index = [], False, 0
    while index < len(pattern):
        pair = pattern[index : index + 2]
        if pair == r"\s":
            out.append(SPACE if in_class else f"[{SPACE}]")
        elif pair == r"\S" and not in_class:
            out.append(f"[^{SPACE}]")
        elif pair == r"\S":
            raise ValueError(f"no \\S inside a class, please: {pattern}")
        elif pair.startswith("\\"):
            out.append(pair)
        else:
            pair = pattern[index]
            in_class = (in_class or pair == "[") and not (in_class and pair == "]")
            out.append(pair)
        index += len(pair)
    return "".join(out)
