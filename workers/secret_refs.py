"""An agent's `{"$secret": "name"}` references, resolved on the worker for one execution, and
the redaction of their values from everything the execution writes.

The runtimes get a spec whose config, command env and http headers hold the plain values; they
never see the database. What the execution writes (log lines and their fields, progress
messages, its output and its error) has each value replaced by `[secret:<name>]` before it is
stored, so no API answer and no event can show it. A value transformed by the agent (encoded,
hashed, cut) is not recognised.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from sqlalchemy import Connection

from app.errors import RunyardError
from app.executions.spec import VersionSpec
from app.secrets import references
from app.secrets import services as secret_store
from workers.runtimes import Outcome

# version id -> the secret names its definition refers to (versions never change).
_names: dict[uuid.UUID, frozenset[str]] = {}
# Built once per cached spec: copied onto the resolved spec rather than built per execution.
_VALIDATORS = ("input_validator", "output_validator")


class Redactor:
    """Replaces each resolved value by `[secret:<name>]` in text and in JSON-like values."""

    def __init__(self, values: dict[str, str]) -> None:
        # Longest first: a value that holds another is replaced whole.
        self._pairs = sorted(
            ((value, f"[secret:{name}]") for name, value in values.items() if value),
            key=lambda pair: -len(pair[0]),
        )

    def text(self, text: str) -> str:
        for value, label in self._pairs:
            if value in text:
                text = text.replace(value, label)
        return text

    def value(self, node: Any) -> Any:
        if isinstance(node, str):
            return self.text(node)
        if isinstance(node, dict):
            return {self.value(key): self.value(item) for key, item in node.items()}
        if isinstance(node, list):
            return [self.value(item) for item in node]
        return node

    def outcome(self, outcome: Outcome) -> None:
        outcome.error_message = self.text(outcome.error_message)
        if outcome.hint:
            outcome.hint = self.text(outcome.hint)
        outcome.output = self.value(outcome.output)


def names_of(spec: VersionSpec) -> frozenset[str]:
    found = _names.get(spec.id)
    if found is None:
        found = _names[spec.id] = references.names(spec.config, spec.runtime)
    return found


def resolve(conn: Connection, spec: VersionSpec) -> tuple[VersionSpec, Redactor | None]:
    """The spec with its references replaced by their values, and the redactor of those values
    (None when it refers to none: no statement, no copy). Raises SecretsMissing or KeyMissing."""
    names = names_of(spec)
    if not names:
        return spec, None
    assert spec.org_id is not None, "versions are loaded with their organization"
    values = secret_store.values(conn, spec.org_id, names)
    runtime = spec.runtime
    field = references.RUNTIME_FIELDS.get(runtime.get("type"))
    if field and isinstance(runtime.get(field), dict):
        runtime = {**runtime, field: references.substituted(runtime[field], values)}
        _check_usable(spec.runtime[field], values)
    resolved = dataclasses.replace(
        spec, config=references.substituted(spec.config, values), runtime=runtime
    )
    for name in _VALIDATORS:
        if name in spec.__dict__:
            resolved.__dict__[name] = spec.__dict__[name]
    return resolved, Redactor(values)


class SecretUnusable(RunyardError):
    """A secret's value cannot stand where the agent puts it (a line break in a header)."""


def _check_usable(references_at: dict[str, Any], values: dict[str, str]) -> None:
    """Header and environment values are one line without NUL: a value breaking that would
    fail deep in the runtime, with an error message quoting it in part."""
    for name, node in references_at.items():
        if references.is_reference(node) and any(
            c in values[node[references.KEY]] for c in "\r\n\0"
        ):
            raise SecretUnusable(
                f"the secret {node[references.KEY]!r} holds a line break or NUL, which "
                f"{name!r} cannot carry",
                hint="PUT the secret again as one line, or use it from config instead",
            )


def failure(exc: RunyardError) -> Outcome:
    """The outcome of an execution whose secrets cannot be had or used: no retry helps until
    someone sets the secret again or fixes the worker's keys."""
    return Outcome(
        error_type="secret_missing",
        error_message=exc.message,
        hint=exc.hint,
        retryable=False,
    )
