"""The `runyard` command line, run as a user runs it."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from sqlalchemy import text

from app.db import db

RUNYARD = str(Path(sys.executable).parent / "runyard")


def runyard(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RUNYARD, *args], capture_output=True, text=True, timeout=60, env=env or os.environ.copy()
    )


def test_orgs_create_json_prints_the_org_and_a_working_token(client):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    result = runyard("orgs", "create", name, "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    try:
        assert printed["org"]["name"] == name and uuid.UUID(printed["org"]["id"])
        me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {printed['token']}"})
        assert me.status_code == 200 and me.get_json()["org"]["name"] == name
        again = runyard("orgs", "create", name)
        assert again.returncode == 2 and "exists already" in again.stderr

        viewer = runyard("tokens", "create", name, "--role", "viewer", "--json")
        token = json.loads(viewer.stdout)["token"]
        me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert me.get_json()["token"]["role"] == "viewer"
    finally:
        with db.engine.begin() as conn:
            conn.execute(text("DELETE FROM organizations WHERE name = :name"), {"name": name})


def test_db_upgrade_is_idempotent():
    result = runyard("db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert "database at head" in result.stdout


def test_a_missing_database_url_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["RUNYARD_HOME"] = str(tmp_path)  # no embedded database there to fall back on
    result = runyard("db", "upgrade", env=env)
    assert result.returncode == 2
    assert "DATABASE_URL is not set" in result.stderr and "runyard up" in result.stderr


def test_tokens_list_and_revoke(client):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    created = json.loads(runyard("orgs", "create", name, "--json").stdout)
    try:
        listed = json.loads(runyard("tokens", "list", name, "--json").stdout)
        assert [t["role"] for t in listed] == ["admin"] and listed[0]["revoked_at"] is None
        assert created["token"] not in json.dumps(listed)
        revoked = runyard("tokens", "revoke", listed[0]["id"])
        assert revoked.returncode == 0, revoked.stderr
        me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {created['token']}"})
        assert me.status_code == 401
        assert runyard("tokens", "revoke", "not-an-id").returncode == 2
    finally:
        with db.engine.begin() as conn:
            conn.execute(text("DELETE FROM organizations WHERE name = :name"), {"name": name})


def test_orgs_limits_offers_every_option_of_the_contract():
    """API.md: runyard orgs limits NAME [--max-running N] [--max-queued N] ... [--weight W]."""
    result = runyard("orgs", "limits", "--help")
    assert result.returncode == 0, result.stderr
    for option in (
        "--max-running",
        "--max-queued",
        "--submit-rate",
        "--submit-burst",
        "--cpu-seconds-per-day",
        "--weight",
        "--retention-days",
        "--json",
    ):
        assert option in result.stdout, option
