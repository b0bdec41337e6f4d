"""Migration 0016_secrets: clear webhook and notification secrets are encrypted when a key is
configured, left in clear (and still usable) when none is, and opened again by a downgrade."""

import dataclasses
import uuid

import psycopg
import pytest
from alembic import command
from sqlalchemy.engine import make_url

from app.config import current_config, use_config
from app.migrate import alembic_config
from app.secrets.crypto import is_sealed, readable

BEFORE = "0014_console"
AFTER = "0016_secrets"


@pytest.fixture
def scratch(database_url):
    """A database of its own at the revision before, with a trigger and a notification whose
    secrets are in clear."""
    url = make_url(database_url)
    name = f"{url.database}_sealing"
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    scratch_url = url.set(database=name)
    cfg = alembic_config(scratch_url.render_as_string(hide_password=False))
    command.upgrade(cfg, BEFORE)
    ids = {
        "org": uuid.uuid4(),
        "agent": uuid.uuid4(),
        "trigger": uuid.uuid4(),
        "note": uuid.uuid4(),
    }
    plain = scratch_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute("INSERT INTO organizations (id, name) VALUES (%s, 'o')", (ids["org"],))
        conn.execute(
            "INSERT INTO agents (id, org_id, name) VALUES (%s, %s, 'a')", (ids["agent"], ids["org"])
        )
        conn.execute(
            "INSERT INTO triggers (id, org_id, name, target_kind, target_name, agent_id, input,"
            " secret) VALUES (%s, %s, 't', 'agent', 'a', %s, '{}', 'whsec_trigger')",
            (ids["trigger"], ids["org"], ids["agent"]),
        )
        conn.execute(
            "INSERT INTO notifications (id, org_id, name, url, events, secret)"
            " VALUES (%s, %s, 'n', 'http://127.0.0.2:9/', '{execution.failed}', 'whsec_note')",
            (ids["note"], ids["org"]),
        )

    def secrets() -> tuple[str, str]:
        with psycopg.connect(plain) as conn:
            trigger = conn.execute("SELECT secret FROM triggers").fetchone()[0]
            note = conn.execute("SELECT secret FROM notifications").fetchone()[0]
        return trigger, note

    yield cfg, ids, secrets
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_with_a_key_the_migration_encrypts_and_the_downgrade_decrypts(scratch):
    cfg, ids, secrets = scratch
    command.upgrade(cfg, AFTER)
    trigger, note = secrets()
    assert is_sealed(trigger) and is_sealed(note)
    assert "whsec_" not in trigger + note
    assert readable(trigger, f"trigger:{ids['trigger']}") == "whsec_trigger"
    assert readable(note, f"notification:{ids['note']}") == "whsec_note"
    command.downgrade(cfg, BEFORE)
    assert secrets() == ("whsec_trigger", "whsec_note")


def test_without_a_key_the_clear_values_stay_and_still_read(scratch):
    cfg, ids, secrets = scratch
    configured = current_config()
    use_config(dataclasses.replace(configured, secret_keys=()))
    try:
        command.upgrade(cfg, AFTER)
    finally:
        use_config(configured)
    trigger, note = secrets()
    assert (trigger, note) == ("whsec_trigger", "whsec_note")
    assert readable(trigger, f"trigger:{ids['trigger']}") == "whsec_trigger"
