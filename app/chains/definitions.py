"""Chain definitions: their plan (steps, stages), references, and the checks made at creation.

A definition's `steps` is a list of steps and `parallel` groups. Flattened, every step gets an
index and a stage: the steps of one stage run at once, a stage starts when the one before it has
finished. A `parallel` group's name refers to all its steps: its output is an object keyed by
their names.

The type checks of a definition are app/chains/typecheck.py's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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
