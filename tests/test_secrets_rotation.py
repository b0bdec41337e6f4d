"""Key rotation: sealed under key A, keys set to "B,A", `runyard secrets reencrypt`, then key B
alone opens everything (secrets, webhook and notification secrets) and key A alone nothing."""

import base64
import dataclasses
import json
import os
import re

import pytest
from sqlalchemy import text

from app.config import current_config, use_config
from app.db import db
from app.secrets import services
from app.secrets.crypto import KeyMissing, new_key
from tests.app.test_trigger_signatures import signed_v1
from tests.test_cli import runyard

VALUE = "rotate-me-0123456789"


def reencrypt(keys: str) -> dict[str, tuple[int, int]]:
    result = runyard("secrets", "reencrypt", env={**os.environ, "RUNYARD_SECRET_KEYS": keys})
    assert result.returncode == 0, result.stderr
    counts = {}
    for line in result.stdout.splitlines():
        what, resealed, total = re.fullmatch(
            r"(\w+): (\d+) re-encrypted, (\d+) in all", line
        ).groups()
        counts[what] = (int(resealed), int(total))
    assert set(counts) == {"secrets", "triggers", "notifications"}
    return counts


@pytest.fixture
def keys():
    """Set this process's key list for the test; the configured one again afterwards."""
    configured = current_config()

    def use(*texts: str) -> None:
        use_config(dataclasses.replace(configured, secret_keys=texts))

    yield use
    use_config(configured)


def deliver(client, trigger, event):
    raw = json.dumps(event).encode()
    return client.post(trigger["url"], data=raw, headers=signed_v1(trigger["secret"], raw))


def test_rotation_with_two_keys(app, live_org, keys):
    client = app.test_client()
    key_a, key_b = current_config().secret_keys[0], new_key()
    response = client.put(
        "/api/v1/secrets/rotated", json={"value": VALUE}, headers=live_org.headers
    )
    assert response.status_code == 200
    agent = {"name": "echo", "runtime": {"type": "python", "entrypoint": "tests.agents:echo"}}
    assert client.post("/api/v1/agents", json=agent, headers=live_org.headers).status_code == 201
    trigger = client.post(
        "/api/v1/triggers",
        json={"name": "hook", "target": {"agent": "echo"}, "input": {}},
        headers=live_org.headers,
    ).get_json()
    # As the migration leaves it when no key was configured: in clear.
    with db.engine.begin() as conn:
        conn.execute(
            text("UPDATE triggers SET secret = :secret WHERE id = :id"),
            {"secret": trigger["secret"], "id": trigger["id"]},
        )
    try:
        counts = reencrypt(f"{key_b},{key_a}")
        assert counts["secrets"][0] >= 1 and counts["triggers"][0] >= 1
        assert reencrypt(f"{key_b},{key_a}")["secrets"][0] == 0  # all under B now

        keys(key_b)
        with db.hot() as conn:
            assert services.values(conn, live_org.id, frozenset({"rotated"})) == {"rotated": VALUE}
        assert deliver(client, trigger, {"n": 1}).status_code == 202
        with db.hot() as conn:
            stored = conn.execute(
                text("SELECT secret FROM triggers WHERE id = :id"), {"id": trigger["id"]}
            ).scalar_one()
        assert stored.startswith("ry1.") and trigger["secret"] not in stored

        keys(key_a)
        with db.hot() as conn, pytest.raises(KeyMissing, match="not in RUNYARD_SECRET_KEYS"):
            services.values(conn, live_org.id, frozenset({"rotated"}))
        refused = deliver(client, trigger, {"n": 2})
        assert refused.status_code == 503 and "reencrypt" in refused.get_json()["hint"]
    finally:
        # Back under the session's key, for the worker and the tests that come after.
        reencrypt(f"{key_a},{key_b}")


def test_reencrypt_without_a_key_says_how_to_set_one(app):
    env = {**os.environ, "RUNYARD_SECRET_KEYS": "", "RUNYARD_HOME": "/nonexistent"}
    result = runyard("secrets", "reencrypt", env=env)
    assert result.returncode == 2 and "RUNYARD_SECRET_KEYS" in result.stderr
    assert "hint:" in result.stderr


def test_runyard_up_makes_one_key_readable_by_its_owner_only(tmp_path, monkeypatch):
    from app.secrets.crypto import KEY_BYTES
    from app.up import SECRET_KEYS_FILE, secret_keys

    monkeypatch.delenv("RUNYARD_SECRET_KEYS", raising=False)
    made = secret_keys(tmp_path)
    assert len(base64.b64decode(made)) == KEY_BYTES
    assert (tmp_path / SECRET_KEYS_FILE).stat().st_mode & 0o777 == 0o600
    assert secret_keys(tmp_path) == made  # the next start reuses it
    monkeypatch.setenv("RUNYARD_SECRET_KEYS", "configured")
    assert secret_keys(tmp_path) == "configured"
