"""Manifests and discovery, without a server: the shipped examples match what `runyard up`
loads, and `@runyard_client.agent` declares an agent without changing the function."""

from __future__ import annotations

import sys
import textwrap

import pytest

import runyard_client
from runyard_client import manifests
from tests.conftest import ROOT


def test_the_example_manifests_are_the_agents_runyard_up_loads():
    from runyard_examples import AGENTS

    shipped = {m.name: m.body for m in manifests.load(ROOT / "examples" / "agents")}
    assert shipped == {definition["name"]: definition for definition in AGENTS}


def test_the_decorator_declares_and_discover_finds_each_agent_once(tmp_path, monkeypatch):
    package = tmp_path / "declared_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from declared_pkg.tools import shout\n")
    (package / "tools.py").write_text(
        textwrap.dedent(
            '''
            import runyard_client

            @runyard_client.agent(timeout_seconds=5, retry={"max_retries": 2}, tags=["t"])
            def shout(payload, ctx):
                """Upper-cases a text."""
                return {"text": payload["text"].upper()}

            def plain(payload, ctx):
                return {}
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = runyard_client.discover("declared_pkg")
    assert found == [
        {
            "name": "shout",
            "runtime": {"type": "python", "entrypoint": "declared_pkg.tools:shout"},
            "description": "Upper-cases a text.",
            "timeout_seconds": 5,
            "retry": {"max_retries": 2},
            "tags": ["t"],
        }
    ]
    assert sys.modules["declared_pkg.tools"].shout({"text": "hi"}, None) == {"text": "HI"}

    (package / "again.py").write_text(
        "import runyard_client\n\n@runyard_client.agent('shout')\ndef other(p, c):\n    return p\n"
    )
    with pytest.raises(runyard_client.RunyardError, match="two agents are called 'shout'"):
        runyard_client.discover("declared_pkg")
    with pytest.raises(runyard_client.RunyardError, match="cannot import"):
        runyard_client.discover("no_such_package_here")


def test_only_changed_fields_count_and_server_defaults_match():
    current = {"retry": {"max_retries": 1, "backoff_seconds": 1}, "tags": ["a"], "name": "x"}
    assert manifests.changes({"name": "x", "retry": {"max_retries": 1}}, current) == {}
    changed = manifests.changes({"name": "x", "tags": ["b"], "retry": {"max_retries": 2}}, current)
    assert set(changed) == {"tags", "retry"}


def test_manifest_files_are_checked(tmp_path):
    (tmp_path / "a.json").write_text('{"name": "same"}')
    (tmp_path / "b.yaml").write_text("name: same\n")
    with pytest.raises(manifests.ManifestError, match="also in"):
        manifests.load(tmp_path)
    (tmp_path / "b.yaml").write_text("- not a mapping\n")
    with pytest.raises(manifests.ManifestError, match="a mapping"):
        manifests.load(tmp_path)
    with pytest.raises(manifests.ManifestError, match="no such file"):
        manifests.load(tmp_path / "missing")
