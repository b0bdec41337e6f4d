"""The client's typed results and the server's OpenAPI document cannot drift: every TypedDict of
runyard_client.types has exactly the properties of its schema in /api/v1/openapi.json, each with
a Python type that fits the schema's type (and `| None` where the schema is nullable)."""

from __future__ import annotations

import types
import typing

import pytest

from runyard_client import types as client_types

# TypedDict -> the component schema it mirrors.
MIRRORS = {
    "ErrorInfo": "ErrorInfo",
    "Progress": "Progress",
    "Agent": "Agent",
    "Execution": "Execution",
    "JournalEntry": "JournalEntry",
    "Document": "Document",
    "AttachedDocument": "AttachedDocument",
    "LogLine": "LogLine",
    "Chain": "Chain",
    "ChainExecution": "ChainExecution",
    "Schedule": "Schedule",
    "ScheduleFire": "Fire",
    "StateKey": "StateKey",
    "StateEntry": "StateEntry",
    "Trigger": "Trigger",
    "EventStarted": "EventStarted",
    "EventAccepted": "EventAccepted",
    "SentEvent": "Event",
    "Wallet": "Wallet",
    "Decision": "Decision",
}
PYTHON_TYPES = {
    "string": str,
    "integer": int,
    "number": float,
    "boolean": bool,
    "object": dict,
    "array": list,
}


@pytest.fixture(scope="module")
def schemas(app) -> dict:
    return app.test_client().get("/api/v1/openapi.json").get_json()["components"]["schemas"]


def _null_only(schema: dict) -> bool:
    return schema.get("enum") == [None]


def _resolved(schema: dict, schemas: dict) -> dict:
    arms = schema.get("anyOf") or []
    if len(arms) == 2 and any(_null_only(arm) for arm in arms):  # a nullable nested object
        [kept] = [arm for arm in arms if not _null_only(arm)]
        return {**_resolved(kept, schemas), "nullable": True}
    if "$ref" in schema:
        return schemas[schema["$ref"].rsplit("/", 1)[1]]
    if "allOf" in schema and len(schema["allOf"]) == 1:  # apispec's nullable $ref
        return {**_resolved(schema["allOf"][0], schemas), "nullable": schema.get("nullable")}
    return schema


def _fits(hint, schema: dict, schemas: dict) -> str | None:
    """Why `hint` does not fit `schema`, or None."""
    nullable = bool(schema.get("nullable"))
    schema = _resolved(schema, schemas)
    nullable = nullable or bool(schema.get("nullable"))
    # `X | None` of a class is a types.UnionType; `Any | None` a typing.Union.
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    arms = list(typing.get_args(hint)) if union else [hint]
    if (type(None) in arms) != nullable:
        return f"nullable is {nullable} in the document"
    arms = [arm for arm in arms if arm is not type(None)]
    if len(arms) != 1:
        return "one type (and None) expected"
    arm = arms[0]
    if arm is typing.Any:
        return None
    origin = typing.get_origin(arm) or arm
    if typing.get_origin(arm) is typing.Literal:
        origin = type(typing.get_args(arm)[0])
    if typing.is_typeddict(origin):
        origin = dict
    expected = PYTHON_TYPES.get(schema.get("type", "object"))
    if expected is float and origin is int:
        return None
    return None if origin is expected else f"{origin} for a {schema.get('type')} in the document"


@pytest.mark.parametrize("name", sorted(MIRRORS))
def test_each_typed_result_has_the_documents_fields_and_types(schemas, name):
    typed = getattr(client_types, name)
    hints = typing.get_type_hints(typed)
    properties = schemas[MIRRORS[name]]["properties"]
    assert set(hints) == set(properties), (
        f"runyard_client.types.{name} lacks {sorted(set(properties) - set(hints))}, has "
        f"{sorted(set(hints) - set(properties))} the document does not"
    )
    problems = {
        field: why
        for field, hint in hints.items()
        if (why := _fits(hint, properties[field], schemas)) is not None
    }
    assert not problems, f"runyard_client.types.{name}: {problems}"
