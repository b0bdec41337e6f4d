"""The bounds of children, on the database alone: a parent's attempt that no longer runs starts
nothing, and an execution starts at most 1,000 children."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from app.durable import children, journal
from tests.workers.test_runs import python_agent, run


def running_parent(client, org, connection) -> uuid.UUID:
    python_agent(client, org, "parent", "double")
    python_agent(client, org, "double", "double")
    parent = uuid.UUID(run(client, org, "parent", {"n": 1}))
    connection.execute(
        text("UPDATE executions SET status = 'running', attempt = 1 WHERE id = :id"),
        {"id": parent},
    )
    return parent


def test_an_execution_starts_at_most_a_thousand_children(client, org, connection):
    parent = running_parent(client, org, connection)
    connection.execute(
        text(
            "INSERT INTO execution_journal (execution_id, seq, org_id, kind, name, status) "
            "SELECT :id, n, :org, 'child', 'double', 'succeeded' FROM generate_series(1, 1000) n"
        ),
        {"id": parent, "org": org.id},
    )
    with pytest.raises(children.ChildRefused, match="started 1000 children already"):
        children.start(connection, org.id, parent, 1, 1001, "double", {"n": 1})


def test_a_parent_whose_attempt_ended_starts_nothing(client, org, connection):
    parent = running_parent(client, org, connection)
    with pytest.raises(journal.Fenced):
        children.start(connection, org.id, parent, 2, 1, "double", {"n": 1})
    started = connection.execute(
        text("SELECT count(*) FROM executions WHERE parent_execution_id = :id"), {"id": parent}
    ).scalar_one()
    assert started == 0
    assert children.start(connection, org.id, parent, 1, 1, "double", {"n": 1})


def test_a_child_of_an_unknown_agent_or_version_is_refused(client, org, connection):
    parent = running_parent(client, org, connection)
    with pytest.raises(children.ChildRefused, match="no agent 'nope'"):
        children.start(connection, org.id, parent, 1, 1, "nope", {})
    with pytest.raises(children.ChildRefused, match=r"has no version '9\.9\.9'"):
        children.start(connection, org.id, parent, 1, 1, "double", {"n": 1}, version="9.9.9")
