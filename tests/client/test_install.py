"""`pip install ./clients/python` alone, in a fresh venv: the client and a `runyard` command
with its client commands, and nothing of the server."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_the_client_installs_alone_without_the_server(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            str(ROOT / "clients" / "python"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    # Run from elsewhere: the repository's app/ must not be importable by accident.
    probe = (
        "import sys, runyard_client\n"
        "from runyard_client.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0\n"
        "assert 'app' not in sys.modules and 'flask' not in sys.modules, 'server imported'\n"
        "print(sorted(m.split('.')[0] for m in sys.modules if m.startswith('runyard')))\n"
    )
    python = venv / "bin" / "python"
    result = subprocess.run(
        [str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "login" in result.stdout and "runyard_client" in result.stdout
    assert " db " not in result.stdout and "orgs" not in result.stdout  # no admin commands

    helped = subprocess.run(
        [str(venv / "bin" / "runyard"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert helped.returncode == 0 and "agents" in helped.stdout
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    installed = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert "runyard-client" in installed and "runyard" not in installed and "flask" not in installed
    # --json needs nothing but httpx; tables say which extra they need.
    env = {"HOME": str(tmp_path), "RUNYARD_URL": "http://127.0.0.1:9", "RUNYARD_TOKEN": "x"}
    runyard = str(venv / "bin" / "runyard")
    as_json = subprocess.run(
        [runyard, "agents", "ls", "--json"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert as_json.returncode == 1 and "cannot reach" in as_json.stderr
    table = subprocess.run(
        [runyard, "agents", "ls"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert table.returncode == 2 and "runyard-client[cli]" in table.stderr
