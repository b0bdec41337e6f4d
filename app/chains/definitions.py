"""Chain definitions: their plan (steps, stages), references, and the checks made at creation.

A definition's `steps` is a list of steps and `parallel` groups. Flattened, every step gets an
index and a stage: the steps of one stage run at once, a stage starts when the one before it has
finished. A `parallel` group's name refers to all its steps: its output is an object keyed by
their names.

Type checks compare JSON Schemas conservatively: a schema without a `type` (or `const`/`enum`)
says nothing and passes; a declared type that the receiving schema does not accept, or a required
property the sender does not guarantee, is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from app import jsonschemas
from app.errors import ValidationFailed, json_pointer

REF_PREFIX = "$."
_STEP_REF = re.compile(r"^\$\.steps\.([a-z0-9][a-z0-9_-]{0,62})\.output((?:\.[^.]+)*)$")
_INPUT_REF = re.compile(r"^\$\.input((?:\.[^.]+)*)$")


@dataclass(frozen=True)
class Ref:
    """`$.input.a.b` (step None) or `$.steps.<step>.output.a.b`."""

    step: str | None
    path: tuple[str, ...]


def parse_ref(value: str) -> Ref | None:
    match = _INPUT_REF.match(value)
    if match:
        return Ref(None, tuple(p for p in match.group(1).split(".") if p))
    match = _STEP_REF.match(value)
    if match:
        return Ref(match.group(1), tuple(p for p in match.group(2).split(".") if p))
    return None


def is_ref(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(REF_PREFIX)


def refs_in(template: Any, pointer: str = "") -> Iterable[tuple[str, str]]:
    """Every reference string in an input template, with its pointer."""
    if is_ref(template):
        yield pointer, template
    elif isinstance(template, dict):
        for key, value in template.items():
            yield from refs_in(value, pointer + json_pointer([key]))
    elif isinstance(template, list):
        for index, value in enumerate(template):
            yield from refs_in(value, f"{pointer}/{index}")


@dataclass(frozen=True)
class Step:
    index: int
    name: str
    stage: int
    agent: str
    version: str | None
    input: Any  # the template; None means "the previous stage's output"
    compensate: dict[str, Any] | None
    pointer: str


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    stages: tuple[tuple[int, ...], ...]
    groups: dict[str, tuple[int, ...]]  # a parallel group's name -> its steps
    on_failure: str
    by_name: dict[str, Step] = field(default_factory=dict)

    def stage_of_name(self, name: str) -> int | None:
        if name in self.by_name:
            return self.by_name[name].stage
        if name in self.groups:
            return self.steps[self.groups[name][0]].stage
        return None

    def names_in(self, name: str) -> tuple[int, ...]:
        return self.groups.get(name) or (self.by_name[name].index,)

    def default_source(self, stage: int) -> Ref | tuple[int, ...]:
        """What a step without `input` receives: the chain input or the previous stage."""
        if stage == 0:
            return Ref(None, ())
        return self.stages[stage - 1]

    def needed_steps(self, step: Step, template: Any) -> list[int]:
        """Step indexes whose outputs a template (or the default input) reads."""
        if template is None:
            source = self.default_source(step.stage)
            return [] if isinstance(source, Ref) else list(source)
        needed: list[int] = []
        for _pointer, value in refs_in(template):
            ref = parse_ref(value)
            if ref and ref.step:
                needed.extend(self.names_in(ref.step))
        return needed


def plan_for(steps: list[dict[str, Any]], on_failure: str) -> Plan:
    flat: list[Step] = []
    stages: list[tuple[int, ...]] = []
    groups: dict[str, tuple[int, ...]] = {}
    for position, item in enumerate(steps):
        members = item.get("parallel", [item])
        indexes = []
        for member_position, member in enumerate(members):
            pointer = (
                f"/steps/{position}/parallel/{member_position}"
                if "parallel" in item
                else f"/steps/{position}"
            )
            indexes.append(len(flat))
            flat.append(
                Step(
                    index=len(flat),
                    name=member["name"],
                    stage=len(stages),
                    agent=member["agent"],
                    version=member.get("version"),
                    input=member.get("input"),
                    compensate=member.get("compensate"),
                    pointer=pointer,
                )
            )
        if "parallel" in item:
            groups[item["name"]] = tuple(indexes)
        stages.append(tuple(indexes))
    return Plan(
        steps=tuple(flat),
        stages=tuple(stages),
        groups=groups,
        on_failure=on_failure,
        by_name={step.name: step for step in flat},
    )


# ---------------------------------------------------------------------------------------------
# Runtime: resolving a template against the chain's state


_MISSING = object()


def _walk(value: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def resolve(template: Any, lookup: Callable[[Ref], Any]) -> Any:
    """The input a template describes. A reference that finds nothing drops its key (so an
    optional field stays absent) or, inside a list, becomes null."""
    if is_ref(template):
        ref = parse_ref(template)
        return _MISSING if ref is None else lookup(ref)
    if isinstance(template, dict):
        resolved = {key: resolve(value, lookup) for key, value in template.items()}
        return {key: value for key, value in resolved.items() if value is not _MISSING}
    if isinstance(template, list):
        return [None if (v := resolve(value, lookup)) is _MISSING else v for value in template]
    return template


def state_lookup(
    plan: Plan, chain_input: dict[str, Any], outputs: dict[int, Any]
) -> Callable[[Ref], Any]:
    def lookup(ref: Ref) -> Any:
        if ref.step is None:
            return _walk(chain_input, ref.path)
        if ref.step in plan.groups:
            base = {
                plan.steps[i].name: outputs.get(i) for i in plan.groups[ref.step] if i in outputs
            }
        elif plan.by_name[ref.step].index in outputs:
            base = outputs[plan.by_name[ref.step].index]
        else:
            return _MISSING
        return _walk(base, ref.path)

    return lookup


def step_input(
    plan: Plan, step: Step, template: Any, chain_input: dict[str, Any], outputs: dict[int, Any]
) -> Any:
    lookup = state_lookup(plan, chain_input, outputs)
    if template is not None:
        value = resolve(template, lookup)
        return None if value is _MISSING else value
    source = plan.default_source(step.stage)
    if isinstance(source, Ref):
        return chain_input
    if len(source) == 1:
        return outputs.get(source[0])
    return {plan.steps[i].name: outputs.get(i) for i in source if i in outputs}


# ---------------------------------------------------------------------------------------------
# Creation: structure, references and types


@dataclass(frozen=True)
class AgentSchemas:
    """What the checks need of the agent version a step (or compensation) runs."""

    name: str
    version: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]


@dataclass
class Problems:
    errors: dict[str, list[str]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    def add(self, pointer: str, message: str) -> None:
        self.errors.setdefault(pointer, []).append(message)
        self.messages.append(message)

    def raise_if_any(self) -> None:
        if not self.messages:
            return
        count = len(self.messages)
        summary = (
            self.messages[0] if count == 1 else f"{count} problems: " + "; ".join(self.messages[:5])
        )
        raise ValidationFailed(
            f"the chain definition does not check: {summary}",
            errors=self.errors,
            hint="fix the named steps and fields; GET /api/v1/agents/{name} shows an "
            "agent's input_schema and output_schema",
        )


def check_structure(plan: Plan, document: dict[str, Any], problems: Problems) -> None:
    """Unique names, and references that name an earlier step."""
    seen: dict[str, str] = {}
    for position, item in enumerate(document["steps"]):
        if "parallel" in item:
            _unique(item["name"], f"/steps/{position}/name", seen, problems)
    for step in plan.steps:
        _unique(step.name, step.pointer + "/name", seen, problems)
    for step in plan.steps:
        _check_refs(plan, step, step.input, step.pointer + "/input", step.stage, problems)
        if step.compensate is not None:
            # A compensation runs after the chain stopped: it may read this step's output and
            # any earlier stage's, never a sibling's in its parallel group (that one may have
            # failed, or not be compensated) nor a later step's.
            _check_refs(
                plan,
                step,
                step.compensate.get("input"),
                step.pointer + "/compensate/input",
                step.stage,
                problems,
                also=step.name,
            )


def _unique(name: str, pointer: str, seen: dict[str, str], problems: Problems) -> None:
    if name in seen:
        problems.add(pointer, f"step name {name!r} is used twice (first at {seen[name]})")
    else:
        seen[name] = pointer


def _check_refs(
    plan: Plan,
    step: Step,
    template: Any,
    pointer: str,
    before_stage: int,
    problems: Problems,
    *,
    also: str | None = None,
) -> None:
    for where, value in refs_in(template, pointer):
        ref = parse_ref(value)
        if ref is None:
            problems.add(
                where,
                f"step {step.name!r}: {value!r} is not a reference; use $.input[.path] "
                "or $.steps.<name>.output[.path]",
            )
            continue
        if ref.step is None or ref.step == also:
            continue
        stage = plan.stage_of_name(ref.step)
        if stage is None:
            problems.add(where, f"step {step.name!r} refers to an unknown step {ref.step!r}")
        elif stage >= before_stage and also is not None:
            problems.add(
                where,
                f"the compensation of step {step.name!r} refers to step {ref.step!r}; a "
                "compensation reads only its own step's output and earlier steps' outputs",
            )
        elif stage >= before_stage:
            problems.add(
                where,
                f"step {step.name!r} refers to step {ref.step!r}, which has not finished by "
                f"then (only earlier steps' outputs can be read)",
            )


def check_types(
    plan: Plan,
    input_schema: dict[str, Any],
    agents: dict[int, AgentSchemas],
    compensators: dict[int, AgentSchemas],
    problems: Problems,
) -> None:
    """Each step's input, as the references and literals build it, against its agent's
    input_schema; the same for compensations."""

    def source_schema(ref: Ref) -> tuple[Any, bool]:
        if ref.step is None:
            return _schema_at(input_schema, ref.path)
        if ref.step in plan.groups:
            members = [plan.steps[i] for i in plan.groups[ref.step]]
            whole = {
                "type": "object",
                "required": [m.name for m in members],
                "properties": {
                    m.name: agents[m.index].output_schema for m in members if m.index in agents
                },
            }
            return _schema_at(whole, ref.path)
        target = plan.by_name[ref.step]
        if target.index not in agents:
            return {}, True
        return _schema_at(agents[target.index].output_schema, ref.path)

    def default_schema(stage: int) -> tuple[Any, str]:
        source = plan.default_source(stage)
        if isinstance(source, Ref):
            return input_schema, "the chain's input"
        if len(source) == 1:
            previous = plan.steps[source[0]]
            return (
                agents[previous.index].output_schema if previous.index in agents else {},
                f"the output of step {previous.name!r}",
            )
        members = [plan.steps[i] for i in source]
        return {
            "type": "object",
            "required": [m.name for m in members],
            "properties": {
                m.name: agents[m.index].output_schema for m in members if m.index in agents
            },
        }, "the outputs of the parallel steps " + ", ".join(repr(m.name) for m in members)

    for step in plan.steps:
        if step.index in agents:
            target = agents[step.index]
            label = f"step {step.name!r} (agent {target.name!r} {target.version})"
            if step.input is None:
                schema, what = default_schema(step.stage)
                for where, message in _flow(schema, True, target.input_schema, ""):
                    problems.add(
                        step.pointer + where,
                        f"{label}: receives {what}, which {message}"
                        + (f" at {where}" if where else ""),
                    )
            else:
                _check_template(
                    step.input,
                    target.input_schema,
                    step.pointer + "/input",
                    label,
                    source_schema,
                    problems,
                )
        if step.index in compensators:
            target = compensators[step.index]
            label = f"compensation of step {step.name!r} (agent {target.name!r} {target.version})"
            template = step.compensate.get("input") if step.compensate else None
            if template is None:
                own = agents[step.index].output_schema if step.index in agents else {}
                for where, message in _flow(own, True, target.input_schema, ""):
                    problems.add(
                        step.pointer + "/compensate" + where,
                        f"{label}: receives the output of step {step.name!r}, which {message}"
                        + (f" at {where}" if where else ""),
                    )
            else:
                _check_template(
                    template,
                    target.input_schema,
                    step.pointer + "/compensate/input",
                    label,
                    source_schema,
                    problems,
                )


def _check_template(
    template: Any,
    target: Any,
    pointer: str,
    label: str,
    source_schema: Callable[[Ref], tuple[Any, bool]],
    problems: Problems,
) -> None:
    if is_ref(template):
        ref = parse_ref(template)
        if ref is None:
            return
        try:
            schema, guaranteed = source_schema(ref)
        except KeyError:  # an unknown step: reported by the structure check
            return
        if schema is None:
            problems.add(pointer, f"{label}: {template} names a field its source does not have")
            return
        if not guaranteed:
            problems.add(
                pointer,
                f"{label}: {template} may be absent, but the input needs it",
            )
        for where, message in _flow(schema, True, target, ""):
            problems.add(
                pointer + where,
                f"{label}: {template} {message}" + (f" at {where}" if where else ""),
            )
        return
    if isinstance(template, dict) and isinstance(target, dict):
        types = _types(target)
        if types is not None and "object" not in types:
            problems.add(pointer, f"{label}: an object is given where {sorted(types)} is expected")
            return
        properties = target.get("properties") or {}
        for name in target.get("required") or []:
            if name not in template:
                problems.add(
                    pointer,
                    f"{label}: the input's required field {name!r} is not given",
                )
        for key, value in template.items():
            where = pointer + json_pointer([key])
            if key in properties:
                sub = properties[key]
            elif target.get("additionalProperties") is False:
                problems.add(where, f"{label}: the input_schema has no field {key!r}")
                continue
            else:
                sub = target.get("additionalProperties")
                sub = sub if isinstance(sub, dict) else {}
            if is_ref(value) and key not in (target.get("required") or []):
                # An optional field may be absent at runtime: only the type must fit.
                ref = parse_ref(value)
                if ref is not None:
                    try:
                        schema, _guaranteed = source_schema(ref)
                    except KeyError:
                        continue
                    if schema is None:
                        problems.add(
                            where, f"{label}: {value} names a field its source does not have"
                        )
                        continue
                    for inner, message in _flow(schema, True, sub, ""):
                        problems.add(
                            where + inner,
                            f"{label}: field {key!r} from {value} {message}"
                            + (f" at {inner}" if inner else ""),
                        )
                continue
            _check_template(value, sub, where, f"{label}, field {key!r}", source_schema, problems)
        return
    if isinstance(template, list):
        types = _types(target) if isinstance(target, dict) else None
        if types is not None and "array" not in types:
            problems.add(pointer, f"{label}: an array is given where {sorted(types)} is expected")
            return
        items = target.get("items") if isinstance(target, dict) else None
        for index, value in enumerate(template):
            _check_template(
                value,
                items if isinstance(items, dict) else {},
                f"{pointer}/{index}",
                label,
                source_schema,
                problems,
            )
        return
    # A literal: it must itself be valid for the part of the schema it lands in.
    if isinstance(target, dict) and target:
        errors = jsonschemas.instance_errors(jsonschemas.validator_for(target), template, pointer)
        for where, messages in errors.items():
            for message in messages:
                problems.add(where, f"{label}: the literal does not fit: {message}")


def _schema_at(schema: Any, path: tuple[str, ...]) -> tuple[Any, bool]:
    """The schema of a path inside a value of `schema`, and whether the path is guaranteed to
    exist. None when the schema rules the path out."""
    guaranteed = True
    for part in path:
        if not isinstance(schema, dict):
            return {}, False
        types = _types(schema)
        if (types is None or "object" in types) and part in (schema.get("properties") or {}):
            guaranteed = guaranteed and part in (schema.get("required") or [])
            schema = schema["properties"][part]
        elif types is not None and "array" in types and part.isdigit():
            guaranteed = False
            items = schema.get("items")
            schema = items if isinstance(items, dict) else {}
        elif schema.get("additionalProperties") is False or (
            types is not None and not types & {"object", "array"}
        ):
            return None, False
        else:
            extra = schema.get("additionalProperties")
            schema = extra if isinstance(extra, dict) else {}
            guaranteed = False
    return schema, guaranteed


_JSON_TYPES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
    type(None): "null",
}


def _types(schema: Any) -> set[str] | None:
    """The JSON types a schema admits, or None when it does not say."""
    if not isinstance(schema, dict):
        return None
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return set(declared)
    if "const" in schema:
        return {_JSON_TYPES.get(type(schema["const"]), "object")}
    if isinstance(schema.get("enum"), list):
        return {_JSON_TYPES.get(type(value), "object") for value in schema["enum"]}
    return None


def _accepts(accepted: set[str], offered: str) -> bool:
    return offered in accepted or (offered == "integer" and "number" in accepted)


def _flow(source: Any, present: bool, target: Any, where: str) -> list[tuple[str, str]]:
    """Why a value of `source` may not fit `target`: (pointer, message) pairs."""
    if not isinstance(source, dict) or not isinstance(target, dict):
        return []
    offered, accepted = _types(source), _types(target)
    if offered is not None and accepted is not None:
        wrong = sorted(t for t in offered if not _accepts(accepted, t))
        if wrong:
            return [
                (
                    where,
                    f"gives {'/'.join(wrong)}, but the input accepts {'/'.join(sorted(accepted))}",
                )
            ]
    problems: list[tuple[str, str]] = []
    objects = (offered is None or "object" in offered) and (
        accepted is None or "object" in accepted
    )
    if objects and present:
        source_props = source.get("properties") or {}
        source_required = set(source.get("required") or [])
        target_props = target.get("properties") or {}
        for name in target.get("required") or []:
            if name not in source_required:
                problems.append(
                    (
                        where,
                        f"does not guarantee the required field {name!r}"
                        + (
                            " (its output_schema declares it optional)"
                            if name in source_props
                            else ""
                        ),
                    )
                )
        for name, sub in target_props.items():
            if name in source_props:
                problems.extend(
                    _flow(source_props[name], name in source_required, sub, f"{where}/{name}")
                )
    arrays = (
        offered is not None and "array" in offered and accepted is not None and "array" in accepted
    )
    if arrays and isinstance(source.get("items"), dict) and isinstance(target.get("items"), dict):
        problems.extend(_flow(source["items"], True, target["items"], f"{where}/items"))
    return problems
