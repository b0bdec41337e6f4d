"""app/chains/definitions.py and typecheck.py on their own: plans, references, the structure and
type checks.

Pure functions on plain dicts: no database, no worker. tests/app/test_chains_api.py covers the
same checks through the API, with agents looked up in the database."""

import pytest

from app.chains.definitions import (
    AgentSchemas,
    Problems,
    Ref,
    check_structure,
    is_ref,
    parse_ref,
    plan_for,
    refs_in,
    resolve,
    step_input,
)
from app.chains.typecheck import check_types
from app.errors import ValidationFailed

NUMBER_IN = {
    "type": "object",
    "required": ["value"],
    "properties": {"value": {"type": "integer"}, "by": {"type": "integer"}},
}
NUMBER_OUT = {"type": "object", "required": ["value"], "properties": {"value": {"type": "integer"}}}
TEXT_IN = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
TEXT_OUT = {
    "type": "object",
    "required": ["echo"],
    "properties": {"echo": {"type": "string"}, "note": {"type": "string"}},
}
# The agents the steps below name, as the chain services would find them.
AGENTS = {
    "adder": AgentSchemas("adder", "1.0.0", NUMBER_IN, NUMBER_OUT),
    "texter": AgentSchemas("texter", "1.0.0", TEXT_IN, TEXT_OUT),
    "measure": AgentSchemas(
        "measure",
        "1.0.0",
        {"type": "object", "required": ["n"], "properties": {"n": {"type": "number"}}},
        {},
    ),
    "tagger": AgentSchemas(
        "tagger",
        "1.0.0",
        {
            "type": "object",
            "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
            "additionalProperties": False,
        },
        {"type": "object"},
    ),
}


def structure(*steps):
    problems = Problems()
    check_structure(plan_for(list(steps), "stop"), {"steps": list(steps)}, problems)
    return problems


def types(*steps, input_schema=NUMBER_IN):
    """Type problems of a definition whose structure is fine (the services check types only
    then); every agent named in AGENTS is found."""
    assert not structure(*steps).messages, structure(*steps).messages
    plan = plan_for(list(steps), "stop")
    agents = {s.index: AGENTS[s.agent] for s in plan.steps if s.agent in AGENTS}
    compensators = {
        s.index: AGENTS[s.compensate["agent"]]
        for s in plan.steps
        if s.compensate and s.compensate["agent"] in AGENTS
    }
    problems = Problems()
    check_types(plan, input_schema, agents, compensators, problems)
    return problems


def only(problems, pointer):
    """The messages at `pointer`, which must be the only pointer with problems."""
    assert list(problems.errors) == [pointer], problems.errors
    return " ".join(problems.errors[pointer])


def fan(*members, name="fan"):
    return {"name": name, "parallel": list(members)}


# --- plans and references ---------------------------------------------------------------------


def test_a_plan_flattens_parallel_groups_into_stages():
    plan = plan_for(
        [
            {"name": "a", "agent": "adder"},
            fan({"name": "x", "agent": "adder"}, {"name": "y", "agent": "texter", "input": {}}),
            {"name": "z", "agent": "adder", "version": "1.0.0"},
        ],
        "continue",
    )
    assert [(s.index, s.name, s.stage) for s in plan.steps] == [
        (0, "a", 0),
        (1, "x", 1),
        (2, "y", 1),
        (3, "z", 2),
    ]
    assert plan.stages == ((0,), (1, 2), (3,))
    assert plan.groups == {"fan": (1, 2)}
    assert [s.pointer for s in plan.steps] == [
        "/steps/0",
        "/steps/1/parallel/0",
        "/steps/1/parallel/1",
        "/steps/2",
    ]
    assert plan.steps[3].version == "1.0.0" and plan.steps[0].version is None
    assert plan.steps[2].input == {} and plan.steps[1].input is None
    assert plan.on_failure == "continue"
    assert plan.stage_of_name("fan") == 1 and plan.stage_of_name("z") == 2
    assert plan.stage_of_name("nope") is None
    assert plan.names_in("fan") == (1, 2) and plan.names_in("z") == (3,)
    assert plan.default_source(0) == Ref(None, ())
    assert plan.default_source(2) == (1, 2)
    # Without `input` a step reads the whole previous stage; with one, what it refers to.
    assert plan.needed_steps(plan.steps[3], None) == [1, 2]
    assert plan.needed_steps(plan.steps[0], None) == []
    template = {"a": "$.steps.fan.output.x", "b": ["$.steps.a.output.value", "$.input.v", 3]}
    assert plan.needed_steps(plan.steps[3], template) == [1, 2, 0]


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("$.input", Ref(None, ())),
        ("$.input.a.b", Ref(None, ("a", "b"))),
        ("$.steps.first.output", Ref("first", ())),
        ("$.steps.s-1_b.output.items.0", Ref("s-1_b", ("items", "0"))),
        ("$.outputs.a", None),
        ("$.steps.first", None),
        ("$.steps.First.output", None),  # step names are lower case
        ("$.input.", None),
    ],
)
def test_parse_ref(text, ref):
    assert parse_ref(text) == ref


def test_only_strings_starting_with_dollar_dot_are_references():
    assert is_ref("$.anything") and is_ref("$.")
    assert not is_ref("$input") and not is_ref("input") and not is_ref(None)
    assert not is_ref(["$.input"]) and not is_ref({"$.input": 1})
    template = {"a/b": "$.input.x", "list": [1, "$.steps.s.output", {"c": "$.input"}], "d": "$x"}
    assert list(refs_in(template, "/steps/0/input")) == [
        ("/steps/0/input/a~1b", "$.input.x"),
        ("/steps/0/input/list/1", "$.steps.s.output"),
        ("/steps/0/input/list/2/c", "$.input"),
    ]


def test_a_template_resolves_against_the_chain_state():
    plan = plan_for(
        [
            {"name": "a", "agent": "adder"},
            fan({"name": "x", "agent": "adder"}, {"name": "y", "agent": "adder"}),
            {"name": "z", "agent": "adder"},
        ],
        "stop",
    )
    outputs = {0: {"value": 1, "list": [10, 20]}, 1: {"value": 2}}
    chain_input = {"value": 7}
    template = {
        "v": "$.steps.a.output.value",
        "second": "$.steps.a.output.list.1",
        "fan": "$.steps.fan.output",
        "gone": "$.steps.y.output.value",  # y has not finished: the key is dropped
        "in": ["$.input.value", "$.input.missing", "literal"],
    }
    assert step_input(plan, plan.steps[3], template, chain_input, outputs) == {
        "v": 1,
        "second": 20,
        "fan": {"x": {"value": 2}},
        "in": [7, None, "literal"],
    }
    # Without a template: the chain input, the previous step's output, or the group's outputs.
    assert step_input(plan, plan.steps[0], None, chain_input, outputs) == chain_input
    assert step_input(plan, plan.steps[1], None, chain_input, outputs) == outputs[0]
    assert step_input(plan, plan.steps[3], None, chain_input, outputs) == {"x": {"value": 2}}
    # A $. string that is no reference resolves to nothing: its key is dropped, an item is null.
    assert resolve({"k": "$.bad", "l": ["$.bad"]}, lambda ref: 1) == {"l": [None]}


# --- structure: names and references ----------------------------------------------------------


def test_a_reference_to_an_unknown_step():
    problems = structure(
        {"name": "a", "agent": "adder"},
        {"name": "b", "agent": "adder", "input": {"value": "$.steps.nope.output.value"}},
    )
    assert only(problems, "/steps/1/input/value") == "step 'b' refers to an unknown step 'nope'"


def test_a_reference_to_a_later_step():
    problems = structure(
        {"name": "a", "agent": "adder", "input": {"value": "$.steps.b.output.value"}},
        {"name": "b", "agent": "adder"},
    )
    assert "step 'a' refers to step 'b', which has not finished by then" in only(
        problems, "/steps/0/input/value"
    )


def test_a_reference_to_itself_or_a_sibling_in_the_same_parallel_group():
    problems = structure(
        fan(
            {"name": "x", "agent": "adder", "input": {"value": "$.steps.x.output.value"}},
            {"name": "y", "agent": "adder", "input": {"value": "$.steps.fan.output.x.value"}},
        )
    )
    assert sorted(problems.errors) == [
        "/steps/0/parallel/0/input/value",
        "/steps/0/parallel/1/input/value",
    ]
    assert "refers to step 'fan', which has not finished" in " ".join(
        problems.errors["/steps/0/parallel/1/input/value"]
    )


def test_earlier_steps_groups_and_the_chain_input_may_be_read():
    problems = structure(
        {"name": "a", "agent": "adder", "input": {"value": "$.input.value"}},
        fan({"name": "x", "agent": "adder"}, {"name": "y", "agent": "adder"}),
        {
            "name": "z",
            "agent": "adder",
            "input": {"value": "$.steps.fan.output.y.value", "by": "$.steps.a.output.value"},
        },
    )
    assert problems.messages == [] and problems.errors == {}


def test_a_dollar_dot_string_that_is_no_reference_is_refused_and_other_strings_are_literals():
    problems = structure(
        {"name": "a", "agent": "adder", "input": {"value": "$.outputs.a", "by": "$ 5", "c": "x"}}
    )
    assert "'$.outputs.a' is not a reference" in only(problems, "/steps/0/input/value")


def test_duplicate_step_names_point_at_the_second_and_name_the_first():
    problems = structure(
        {"name": "a", "agent": "adder"},
        fan({"name": "a", "agent": "adder"}, {"name": "b", "agent": "adder"}, name="b"),
    )
    assert problems.errors == {
        "/steps/1/parallel/0/name": ["step name 'a' is used twice (first at /steps/0/name)"],
        # A group's name is a step name too: it is checked first.
        "/steps/1/parallel/1/name": ["step name 'b' is used twice (first at /steps/1/name)"],
    }


def test_a_compensation_reads_its_own_step_and_earlier_ones_never_a_sibling():
    compensate = {
        "agent": "adder",
        "input": {
            "mine": "$.steps.y.output.value",
            "before": "$.steps.a.output.value",
            "sibling": "$.steps.x.output.value",
            "later": "$.steps.z.output.value",
        },
    }
    problems = structure(
        {"name": "a", "agent": "adder"},
        fan(
            {"name": "x", "agent": "adder"},
            {"name": "y", "agent": "adder", "compensate": compensate},
        ),
        {"name": "z", "agent": "adder"},
    )
    pointer = "/steps/1/parallel/1/compensate/input/"
    assert sorted(problems.errors) == [pointer + "later", pointer + "sibling"]
    assert problems.errors[pointer + "sibling"] == [
        "the compensation of step 'y' refers to step 'x'; a compensation reads only its own "
        "step's output and earlier steps' outputs"
    ]


def test_problems_raise_one_422_listing_them_all():
    problems = Problems()
    problems.raise_if_any()  # none: nothing raised
    problems.add("/steps/0/name", "first")
    with pytest.raises(ValidationFailed) as one:
        problems.raise_if_any()
    assert one.value.message == "the chain definition does not check: first"
    for n in range(2, 8):
        problems.add(f"/steps/{n}", f"problem {n}")
    problems.add("/steps/0/name", "again")
    with pytest.raises(ValidationFailed) as many:
        problems.raise_if_any()
    assert many.value.status_code == 422 and many.value.hint
    assert many.value.message == (
        "the chain definition does not check: 8 problems: first; problem 2; problem 3; "
        "problem 4; problem 5"
    )
    assert many.value.errors["/steps/0/name"] == ["first", "again"]
    assert len(many.value.errors) == 7


# --- types ------------------------------------------------------------------------------------


def test_compatible_steps_pass_the_type_check():
    problems = types(
        {"name": "a", "agent": "adder"},
        fan(
            {"name": "x", "agent": "adder"},
            {"name": "y", "agent": "adder", "input": {"value": "$.input.value", "by": 5}},
        ),
        {"name": "z", "agent": "adder", "input": {"value": "$.steps.fan.output.y.value"}},
        {"name": "t", "agent": "texter", "input": {"text": "literal"}},
        {"name": "u", "agent": "texter", "input": {"text": "$.steps.t.output.echo"}},
    )
    assert problems.errors == {} and problems.messages == []


def test_a_whole_output_that_lacks_a_required_field():
    problems = types({"name": "a", "agent": "adder"}, {"name": "b", "agent": "texter"})
    assert only(problems, "/steps/1") == (
        "step 'b' (agent 'texter' 1.0.0): receives the output of step 'a', which does not "
        "guarantee the required field 'text'"
    )


def test_the_first_step_receives_the_chain_input():
    problems = types({"name": "t", "agent": "texter"}, input_schema={"type": "object"})
    assert "receives the chain's input, which does not guarantee the required field 'text'" in (
        only(problems, "/steps/0")
    )
    optional = {"type": "object", "properties": {"text": {"type": "string"}}}
    assert "(its output_schema declares it optional)" in only(
        types({"name": "t", "agent": "texter"}, input_schema=optional), "/steps/0"
    )


def test_after_a_parallel_group_a_step_receives_an_object_keyed_by_its_steps():
    problems = types(
        fan({"name": "x", "agent": "adder"}, {"name": "y", "agent": "adder"}),
        {"name": "z", "agent": "adder"},
    )
    assert only(problems, "/steps/1") == (
        "step 'z' (agent 'adder' 1.0.0): receives the outputs of the parallel steps 'x', 'y', "
        "which does not guarantee the required field 'value'"
    )


def test_a_reference_of_the_wrong_type_names_the_field():
    problems = types(
        {"name": "t", "agent": "texter", "input": {"text": "hello"}},
        {"name": "n", "agent": "adder", "input": {"value": "$.steps.t.output.echo"}},
    )
    assert only(problems, "/steps/1/input/value") == (
        "step 'n' (agent 'adder' 1.0.0), field 'value': $.steps.t.output.echo gives string, "
        "but the input accepts integer"
    )


def test_an_integer_fits_where_a_number_is_expected_not_the_other_way():
    numbers = {"type": "object", "required": ["n"], "properties": {"n": {"type": "number"}}}
    integers = {"type": "object", "required": ["i"], "properties": {"i": {"type": "integer"}}}
    narrowing = types(
        {"name": "a", "agent": "adder", "input": {"value": "$.input.n"}}, input_schema=numbers
    )
    assert "$.input.n gives number, but the input accepts integer" in only(
        narrowing, "/steps/0/input/value"
    )
    widening = types(
        {"name": "m", "agent": "measure", "input": {"n": "$.input.i"}}, input_schema=integers
    )
    assert widening.messages == []


def test_a_required_field_from_a_source_that_may_lack_it():
    problems = types(
        {"name": "t", "agent": "texter", "input": {"text": "hi"}},
        {"name": "u", "agent": "texter", "input": {"text": "$.steps.t.output.note"}},
    )
    assert only(problems, "/steps/1/input/text") == (
        "step 'u' (agent 'texter' 1.0.0), field 'text': $.steps.t.output.note may be absent, "
        "but the input needs it"
    )


def test_an_optional_field_may_be_absent_but_its_type_must_fit():
    absent_is_fine = types(
        {"name": "t", "agent": "texter", "input": {"text": "hi"}},
        {"name": "n", "agent": "adder", "input": {"value": 1, "by": "$.input.by"}},
    )
    assert absent_is_fine.messages == []
    wrong_type = types(
        {"name": "t", "agent": "texter", "input": {"text": "hi"}},
        {"name": "n", "agent": "adder", "input": {"value": 1, "by": "$.steps.t.output.note"}},
    )
    assert only(wrong_type, "/steps/1/input/by") == (
        "step 'n' (agent 'adder' 1.0.0): field 'by' from $.steps.t.output.note gives string, "
        "but the input accepts integer"
    )


def test_a_literal_must_fit_where_it_lands():
    problems = types({"name": "a", "agent": "adder", "input": {"value": "ten", "by": 2}})
    assert "step 'a' (agent 'adder' 1.0.0), field 'value': the literal does not fit" in only(
        problems, "/steps/0/input/value"
    )
    assert types({"name": "a", "agent": "adder", "input": {"value": 10}}).messages == []


def test_a_required_field_not_given_and_a_field_the_schema_does_not_have():
    missing = types({"name": "a", "agent": "adder", "input": {"by": 2}})
    assert only(missing, "/steps/0/input") == (
        "step 'a' (agent 'adder' 1.0.0): the input's required field 'value' is not given"
    )
    extra = types({"name": "g", "agent": "tagger", "input": {"tags": [], "extra": 1}})
    assert only(extra, "/steps/0/input/extra") == (
        "step 'g' (agent 'tagger' 1.0.0): the input_schema has no field 'extra'"
    )


def test_a_reference_to_a_field_the_source_cannot_have():
    problems = types(
        {"name": "a", "agent": "adder", "input": {"value": "$.input.nothing"}},
        input_schema={"type": "object", "additionalProperties": False},
    )
    assert only(problems, "/steps/0/input/value") == (
        "step 'a' (agent 'adder' 1.0.0), field 'value': $.input.nothing names a field its "
        "source does not have"
    )


def test_arrays_are_checked_as_arrays_and_item_by_item():
    problems = types({"name": "g", "agent": "tagger", "input": {"tags": ["a", 2, "$.input.value"]}})
    assert sorted(problems.errors) == ["/steps/0/input/tags/1", "/steps/0/input/tags/2"]
    assert "the literal does not fit" in " ".join(problems.errors["/steps/0/input/tags/1"])
    assert "gives integer, but the input accepts string" in " ".join(
        problems.errors["/steps/0/input/tags/2"]
    )
    wrong_shape = types({"name": "g", "agent": "tagger", "input": {"tags": {"a": 1}}})
    assert only(wrong_shape, "/steps/0/input/tags") == (
        "step 'g' (agent 'tagger' 1.0.0), field 'tags': an object is given where ['array'] is "
        "expected"
    )
    array_for_object = types({"name": "a", "agent": "adder", "input": [1]})
    assert only(array_for_object, "/steps/0/input") == (
        "step 'a' (agent 'adder' 1.0.0): an array is given where ['object'] is expected"
    )


def test_a_parallel_groups_output_is_an_object_of_its_steps_outputs():
    whole_group = types(
        fan(
            {"name": "x", "agent": "adder"},
            {"name": "y", "agent": "texter", "input": {"text": "t"}},
        ),
        {"name": "z", "agent": "texter", "input": {"text": "$.steps.fan.output.y.echo"}},
        {"name": "w", "agent": "adder", "input": {"value": "$.steps.fan.output.y.echo"}},
    )
    assert only(whole_group, "/steps/2/input/value") == (
        "step 'w' (agent 'adder' 1.0.0), field 'value': $.steps.fan.output.y.echo gives string, "
        "but the input accepts integer"
    )
    not_a_member = types(
        fan({"name": "x", "agent": "adder"}, {"name": "y", "agent": "adder"}),
        {"name": "z", "agent": "adder", "input": {"value": "$.steps.fan.output.q"}},
    )
    assert "may be absent" in only(not_a_member, "/steps/1/input/value")


def test_a_compensation_is_type_checked_against_its_own_agent():
    own_output = types(
        {"name": "a", "agent": "adder", "compensate": {"agent": "texter"}},
    )
    assert only(own_output, "/steps/0/compensate") == (
        "compensation of step 'a' (agent 'texter' 1.0.0): receives the output of step 'a', "
        "which does not guarantee the required field 'text'"
    )
    templated = types(
        {
            "name": "a",
            "agent": "adder",
            "compensate": {"agent": "texter", "input": {"text": "$.steps.a.output.value"}},
        },
    )
    assert only(templated, "/steps/0/compensate/input/text") == (
        "compensation of step 'a' (agent 'texter' 1.0.0), field 'text': $.steps.a.output.value "
        "gives integer, but the input accepts string"
    )


def test_a_step_whose_agent_was_not_found_is_not_type_checked():
    plan = plan_for([{"name": "a", "agent": "ghost", "input": {"value": "ten"}}], "stop")
    problems = Problems()
    check_types(plan, NUMBER_IN, {}, {}, problems)
    assert problems.messages == []
