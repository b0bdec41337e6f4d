"""Type checks of a chain definition, made at creation: each step's input, as its references and
literals build it, against the input_schema of the agent that receives it.

JSON Schemas are compared conservatively: a schema without a `type` (or `const`/`enum`) says
nothing and passes; a declared type that the receiving schema does not accept, or a required
property the sender does not guarantee, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app import jsonschemas
from app.chains.definitions import (
    AgentSchemas,
    Plan,
    Problems,
    Ref,
    Step,
    is_ref,
    parse_ref,
)
from app.errors import json_pointer


def check_types(
    plan: Plan,
    input_schema: dict[str, Any],
    agents: dict[int, AgentSchemas],
    compensators: dict[int, AgentSchemas],
    problems: Problems,
) -> None:
    """Each step's input, as the references and literals build it, against its agent's
    input_schema; the same for compensations."""
    checks = _TypeCheck(plan, input_schema, agents, problems)
    for step in plan.steps:
        if step.index in agents:
            checks.check_step_input(step, agents[step.index])
        if step.index in compensators:
            checks.check_compensation_input(step, compensators[step.index])


@dataclass
class _TypeCheck:
    """The type checks of one definition: the schema of what each input is built from (the
    chain's input, steps' outputs, literals) against the input_schema that receives it."""

    plan: Plan
    input_schema: dict[str, Any]
    agents: dict[int, AgentSchemas]
    problems: Problems

    def check_step_input(self, step: Step, target: AgentSchemas) -> None:
        label = f"step {step.name!r} (agent {target.name!r} {target.version})"
        if step.input is None:
            schema, what = self.default_input_schema(step.stage)
            prefix = f"{label}: receives {what}, which"
            self.add_flow_problems(schema, target.input_schema, step.pointer, prefix)
        else:
            self.check_template(step.input, target.input_schema, step.pointer + "/input", label)

    def check_compensation_input(self, step: Step, target: AgentSchemas) -> None:
        label = f"compensation of step {step.name!r} (agent {target.name!r} {target.version})"
        template = step.compensate.get("input") if step.compensate else None
        if template is None:
            own = self.agents[step.index].output_schema if step.index in self.agents else {}
            prefix = f"{label}: receives the output of step {step.name!r}, which"
            self.add_flow_problems(own, target.input_schema, step.pointer + "/compensate", prefix)
        else:
            pointer = step.pointer + "/compensate/input"
            self.check_template(template, target.input_schema, pointer, label)

    def outputs_object(self, members: list[Step]) -> dict[str, Any]:
        """The schema of several steps' outputs together: an object keyed by their names."""
        agents = self.agents
        return {
            "type": "object",
            "required": [m.name for m in members],
            "properties": {
                m.name: agents[m.index].output_schema for m in members if m.index in agents
            },
        }

    def ref_schema(self, ref: Ref) -> tuple[Any, bool]:
        """The schema of what a reference reads, and whether it is sure to be there
        (_schema_at). KeyError for a step the plan does not have."""
        if ref.step is None:
            return _schema_at(self.input_schema, ref.path)
        if ref.step in self.plan.groups:
            members = [self.plan.steps[i] for i in self.plan.groups[ref.step]]
            return _schema_at(self.outputs_object(members), ref.path)
        target = self.plan.by_name[ref.step]
        if target.index not in self.agents:
            return {}, True
        return _schema_at(self.agents[target.index].output_schema, ref.path)

    def default_input_schema(self, stage: int) -> tuple[Any, str]:
        """The schema of what a step without `input` receives, and what to call it."""
        source = self.plan.default_source(stage)
        if isinstance(source, Ref):
            return self.input_schema, "the chain's input"
        if len(source) == 1:
            previous = self.plan.steps[source[0]]
            return (
                self.agents[previous.index].output_schema if previous.index in self.agents else {},
                f"the output of step {previous.name!r}",
            )
        members = [self.plan.steps[i] for i in source]
        names = ", ".join(repr(m.name) for m in members)
        return self.outputs_object(members), "the outputs of the parallel steps " + names

    def add_flow_problems(self, source: Any, target: Any, pointer: str, prefix: str) -> None:
        """A problem for each way a value of `source` may not fit `target` (_flow)."""
        for where, message in _flow(source, True, target, ""):
            at = f" at {where}" if where else ""
            self.problems.add(pointer + where, f"{prefix} {message}{at}")

    def check_template(self, template: Any, target: Any, pointer: str, label: str) -> None:
        if is_ref(template):
            self.check_ref(template, target, pointer, label)
        elif isinstance(template, dict) and isinstance(target, dict):
            self.check_object(template, target, pointer, label)
        elif isinstance(template, list):
            self.check_array(template, target, pointer, label)
        elif isinstance(target, dict) and target:
            # A literal: it must itself be valid for the part of the schema it lands in.
            validator = jsonschemas.validator_for(target)
            errors = jsonschemas.instance_errors(validator, template, pointer)
            for where, messages in errors.items():
                for message in messages:
                    self.problems.add(where, f"{label}: the literal does not fit: {message}")

    def ref_source(self, value: str, pointer: str, label: str) -> tuple[Any, bool] | None:
        """What a reference reads (ref_schema), or None when there is nothing to check it
        against: not a reference, an unknown step, or a field its source cannot have."""
        ref = parse_ref(value)
        if ref is None:
            return None
        try:
            schema, guaranteed = self.ref_schema(ref)
        except KeyError:  # an unknown step: reported by the structure check
            return None
        if schema is None:
            self.problems.add(pointer, f"{label}: {value} names a field its source does not have")
            return None
        return schema, guaranteed

    def check_ref(self, template: str, target: Any, pointer: str, label: str) -> None:
        found = self.ref_source(template, pointer, label)
        if found is None:
            return
        schema, guaranteed = found
        if not guaranteed:
            self.problems.add(pointer, f"{label}: {template} may be absent, but the input needs it")
        self.add_flow_problems(schema, target, pointer, f"{label}: {template}")

    def check_object(
        self, template: dict[str, Any], target: dict[str, Any], pointer: str, label: str
    ) -> None:
        problems = self.problems
        types = _types(target)
        if types is not None and "object" not in types:
            problems.add(pointer, f"{label}: an object is given where {sorted(types)} is expected")
            return
        properties = target.get("properties") or {}
        required = target.get("required") or []
        for name in required:
            if name not in template:
                problems.add(pointer, f"{label}: the input's required field {name!r} is not given")
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
            if is_ref(value) and key not in required:
                # An optional field may be absent at runtime: only the type must fit.
                found = self.ref_source(value, where, label)
                if found is not None:
                    prefix = f"{label}: field {key!r} from {value}"
                    self.add_flow_problems(found[0], sub, where, prefix)
                continue
            self.check_template(value, sub, where, f"{label}, field {key!r}")

    def check_array(self, template: list[Any], target: Any, pointer: str, label: str) -> None:
        types = _types(target) if isinstance(target, dict) else None
        if types is not None and "array" not in types:
            self.problems.add(
                pointer, f"{label}: an array is given where {sorted(types)} is expected"
            )
            return
        items = target.get("items") if isinstance(target, dict) else None
        items = items if isinstance(items, dict) else {}
        for index, value in enumerate(template):
            self.check_template(value, items, f"{pointer}/{index}", label)


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
