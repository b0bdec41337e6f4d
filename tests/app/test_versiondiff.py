"""app/versiondiff.py on its own: which schema and definition changes break callers."""

import pytest

from app.versiondiff import agent_breaks, changes, input_breaks, output_breaks


def paths(breaks):
    return [b["path"] for b in breaks]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ({"type": "string"}, {"type": "string", "minLength": 2}, ["/minLength"]),
        ({"maxLength": 10}, {"maxLength": 20}, []),
        ({"maxLength": 20}, {"maxLength": 10}, ["/maxLength"]),
        ({"minimum": 5}, {"minimum": 1}, []),
        ({"type": "integer"}, {"type": "number"}, []),
        ({"type": ["string", "null"]}, {"type": "string"}, ["/type"]),
        ({}, {"const": 1}, ["/const"]),
        ({"enum": [1, 2]}, {"enum": [1, 2, 3]}, []),
        ({"items": {"type": "number"}}, {"items": {"type": "integer"}}, ["/items/type"]),
        ({"type": "string"}, {"type": "string", "pattern": "^a"}, ["/pattern"]),
        ({"allOf": [{"type": "string"}]}, {}, ["/allOf"]),
        (True, False, ["/not"]),
        ({"description": "old"}, {"description": "new", "title": "t"}, []),
    ],
)
def test_input_breaks(old, new, expected):
    assert paths(input_breaks(old, new, [])) == expected


def test_an_open_object_may_drop_a_property_a_closed_one_may_not():
    old = {"type": "object", "properties": {"a": {}, "b": {}}}
    assert input_breaks(old, {"type": "object", "properties": {"a": {}}}, []) == []
    closed = {"type": "object", "properties": {"a": {}}, "unevaluatedProperties": False}
    assert paths(input_breaks(old, closed, [])) == ["/unevaluatedProperties", "/properties/b"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ({"type": "integer"}, {"type": "number"}, ["/type"]),
        ({"type": "number"}, {"type": "integer"}, []),
        ({"enum": ["a"]}, {"enum": ["a", "b"]}, ["/enum"]),
        ({"enum": ["a", "b"]}, {"enum": ["a"]}, []),
        ({"maximum": 5}, {}, ["/maximum"]),
        ({"maximum": 5}, {"maximum": 9}, ["/maximum"]),
        ({"maximum": 9}, {"maximum": 5}, []),
        ({"minimum": 5}, {"minimum": 1}, ["/minimum"]),
        ({"required": ["a"], "properties": {"a": {}}}, {"properties": {"a": {}}}, ["/required"]),
        ({"properties": {"a": {}}}, {"properties": {"a": {}, "b": {}}}, []),
    ],
)
def test_output_breaks(old, new, expected):
    assert paths(output_breaks(old, new, [])) == expected


def test_reasons_read_from_the_old_version_to_the_new():
    assert output_breaks({"maximum": 5}, {"maximum": 9}, []) == [
        {"path": "/maximum", "reason": "maximum 5 -> 9"}
    ]
    assert output_breaks({"type": "integer"}, {"type": ["integer", "string"]}, []) == [
        {"path": "/type", "reason": "may now be string"}
    ]
    assert input_breaks({"maxLength": 9}, {"maxLength": 5}, []) == [
        {"path": "/maxLength", "reason": "maxLength 9 -> 5"}
    ]
    assert input_breaks({"type": ["integer", "string"]}, {"type": "integer"}, []) == [
        {"path": "/type", "reason": "no longer allows string"}
    ]


AGENT = {
    "runtime": {"type": "python", "entrypoint": "m:f"},
    "input_schema": {"type": "object"},
    "output_schema": {"type": "object"},
    "timeout_seconds": 60,
    "retry": {"max_retries": 2},
    "limits": {"memory_mb": 512},
    "queue": "default",
    "capabilities": ["a", "b"],
    "config": {},
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"timeout_seconds": 120, "queue": "other", "config": {"x": 1}}, []),
        ({"retry": {"max_retries": 1}}, ["/retry/max_retries"]),
        ({"limits": {"memory_mb": 1024}}, []),
        ({"limits": {}}, []),
        ({"limits": {"memory_mb": 256, "cpu_seconds": 5}}, ["/limits/memory_mb"]),
        ({"capabilities": ["b", "c"]}, ["/capabilities"]),
        ({"runtime": {"type": "python", "entrypoint": "m:g"}}, []),
    ],
)
def test_agent_breaks(change, expected):
    assert paths(agent_breaks(AGENT, {**AGENT, **change})) == expected


def test_changes_are_rfc6902_operations_that_turn_old_into_new():
    import jsonpatch

    new = {**AGENT, "capabilities": ["b"], "limits": {}, "timeout_seconds": 5}
    ops = changes(AGENT, new)
    assert jsonpatch.apply_patch(AGENT, ops) == new
    assert {op["op"] for op in ops} <= {"add", "remove", "replace", "move", "copy", "test"}
