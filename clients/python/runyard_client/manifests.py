"""Agents and chains as files: YAML or JSON with the fields of POST /api/v1/agents (or
/chains), and `kind: agent` (the default) or `kind: chain`. Applying one compares it with the
server's current definition, so only a real change becomes a PATCH (and a new version)."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runyard_client.errors import RunyardError

KINDS = ("agent", "chain")
SUFFIXES = (".yaml", ".yml", ".json")
# Fields the server fills with defaults: a manifest that gives some of their keys matches a
# server value that has those keys equal.
FILLED_DICTS = frozenset({"retry", "concurrency", "rate_limit", "limits"})
NOT_COMPARED = frozenset({"name", "kind", "version", "changelog", "force"})


class ManifestError(RunyardError):
    """A manifest file that cannot be read or is not an agent or chain."""


@dataclass
class Manifest:
    kind: str
    name: str
    body: dict[str, Any]
    path: Path | None = None


@dataclass
class Change:
    """What applying one manifest did (or, in a dry run, would do)."""

    kind: str
    name: str
    action: str  # created | updated | unchanged | archived
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "action": self.action,
            "version": self.version,
            "changes": {key: {"from": old, "to": new} for key, (old, new) in self.changes.items()},
        }

    def diff(self) -> str:
        """A unified diff of the changed fields, as JSON."""
        lines: list[str] = []
        for key, (old, new) in self.changes.items():
            before = json.dumps(old, indent=2, sort_keys=True).splitlines()
            after = json.dumps(new, indent=2, sort_keys=True).splitlines()
            lines += difflib.unified_diff(
                before,
                after,
                f"{self.name}.{key} (server)",
                f"{self.name}.{key} (manifest)",
                lineterm="",
            )
        return "\n".join(lines)


def _parse(path: Path) -> Any:
    text = path.read_text()
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ManifestError(f"{path}: not JSON: {exc}") from exc
    try:
        import yaml
    except ImportError as exc:
        raise ManifestError(
            f"{path}: YAML manifests need PyYAML", hint="pip install 'runyard-client[cli]'"
        ) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not YAML: {exc}") from exc


def manifest(document: Any, path: Path | None = None) -> Manifest:
    where = f"{path}: " if path else ""
    if not isinstance(document, dict):
        raise ManifestError(f"{where}a manifest is a mapping of an agent's or chain's fields")
    body = dict(document)
    kind = body.pop("kind", "agent")
    if kind not in KINDS:
        raise ManifestError(f"{where}kind must be agent or chain, not {kind!r}")
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}a manifest needs a name")
    return Manifest(kind, name, body, path)


def load(path: str | Path) -> list[Manifest]:
    """The manifests in a file, or in every .yaml/.yml/.json file of a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    elif path.exists():
        files = [path]
    else:
        raise ManifestError(f"{path}: no such file or folder")
    found = [manifest(_parse(file), file) for file in files]
    seen: dict[tuple[str, str], Path | None] = {}
    for item in found:
        key = (item.kind, item.name)
        if key in seen:
            raise ManifestError(f"{item.path}: {item.kind} {item.name!r} is also in {seen[key]}")
        seen[key] = item.path
    return found


def _same(key: str, wanted: Any, current: Any) -> bool:
    if key in FILLED_DICTS and isinstance(wanted, dict) and isinstance(current, dict):
        return all(current.get(k) == v for k, v in wanted.items())
    return wanted == current


def changes(body: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fields of `body` whose value differs from the server's `current` definition."""
    return {
        key: (current.get(key), value)
        for key, value in body.items()
        if key not in NOT_COMPARED and not _same(key, value, current.get(key))
    }
