"""Logs across executions (GET /logs), streamed exports, and retention (no worker: lines and
finished executions are written the way the worker's store writes them)."""

import csv
import datetime as dt
import io
import json
import uuid

import pytest
from sqlalchemy import text

from app.db import db
from app.executions import store
from app.flow import services as flow
from tests.app.test_executions_api import ECHO, make_agent, submit
from workers import maintenance

NOW = dt.datetime.now(dt.UTC)


def add_lines(connection, org, execution_id, lines):
    """lines: (seq, ts, level, message, fields or None)."""
    for seq, ts, level, message, fields in lines:
        connection.execute(
            text(
                "INSERT INTO execution_logs "
                "(execution_id, seq, attempt, org_id, ts, level, message, fields) "
                "VALUES (:id, :seq, 1, :org_id, :ts, :level, :message, CAST(:fields AS jsonb))"
            ),
            {
                "id": execution_id,
                "seq": seq,
                "org_id": org.id,
                "ts": ts,
                "level": level,
                "message": message,
                "fields": json.dumps(fields) if fields is not None else None,
            },
        )


def new_execution(client, org, agent="echo"):
    response = submit(client, org, agent=agent)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


@pytest.fixture
def logged(client, org, other_org, connection):
    """Two agents' executions of `org` with lines a minute apart, and one of `other_org`."""
    make_agent(client, org)
    other_agent = make_agent(client, org, {**ECHO, "name": "reporter"})
    make_agent(client, other_org)
    first, second = new_execution(client, org), new_execution(client, org)
    third = new_execution(client, org, agent="reporter")
    foreign = new_execution(client, other_org)
    minute = dt.timedelta(minutes=1)
    add_lines(
        connection,
        org,
        first,
        [
            (1, NOW - 10 * minute, 10, "debug: connecting", None),
            (2, NOW - 9 * minute, 20, "Fetched 3 rows", {"rows": 3}),
            (3, NOW - 5 * minute, 40, "it failed: 50% of rows", None),
        ],
    )
    add_lines(connection, org, second, [(1, NOW - 8 * minute, 30, "slow answer", None)])
    add_lines(connection, org, third, [(1, NOW - 7 * minute, 20, "report ready", None)])
    add_lines(connection, other_org, foreign, [(1, NOW - 6 * minute, 40, "rows secret", None)])
    return {
        "first": first,
        "second": second,
        "third": third,
        "foreign": foreign,
        "reporter_id": other_agent["id"],
    }


def search(client, org, **query):
    response = client.get("/api/v1/logs", query_string=query, headers=org.headers)
    assert response.status_code == 200, response.get_json()
    return response


def messages(client, org, **query):
    return [line["message"] for line in search(client, org, **query).get_json()]


def test_search_lists_the_organizations_lines_newest_first(client, org, logged):
    lines = search(client, org).get_json()
    assert [line["message"] for line in lines] == [
        "it failed: 50% of rows",
        "report ready",
        "slow answer",
        "Fetched 3 rows",
        "debug: connecting",
    ]
    fetched = lines[3]
    assert fetched["execution_id"] == logged["first"] and fetched["agent_name"] == "echo"
    assert fetched["seq"] == 2 and fetched["level"] == "info" and fetched["attempt"] == 1
    assert fetched["fields"] == {"rows": 3} and fetched["ts"].startswith(str(NOW.year))
    assert lines[1]["agent_name"] == "reporter"


def test_search_filters(client, org, logged):
    assert messages(client, org, agent="reporter") == ["report ready"]
    assert messages(client, org, agent=logged["reporter_id"]) == ["report ready"]
    assert messages(client, org, agent="nobody") == []
    assert messages(client, org, execution_id=logged["second"]) == ["slow answer"]
    assert messages(client, org, level="warning") == ["it failed: 50% of rows", "slow answer"]
    assert messages(client, org, q="ROWS") == ["it failed: 50% of rows", "Fetched 3 rows"]
    assert messages(client, org, q="50%") == ["it failed: 50% of rows"], "% is no wildcard"
    assert messages(client, org, q="_") == []
    since, until = (NOW - dt.timedelta(minutes=m) for m in (9, 5))
    assert messages(client, org, since=since.isoformat(), until=until.isoformat()) == [
        "report ready",
        "slow answer",
        "Fetched 3 rows",
    ]
    both = messages(client, org, execution_id=logged["first"], level="info", q="rows")
    assert both == ["it failed: 50% of rows", "Fetched 3 rows"]


def test_search_pages(client, org, logged):
    first = search(client, org, page=1, page_size=2)
    assert [line["message"] for line in first.get_json()] == [
        "it failed: 50% of rows",
        "report ready",
    ]
    pagination = json.loads(first.headers["X-Pagination"])
    assert pagination["total"] == 5 and pagination["total_pages"] == 3
    assert pagination["next_page"] == 2
    third = search(client, org, page=3, page_size=2).get_json()
    assert [line["message"] for line in third] == ["debug: connecting"]
    assert search(client, org, page=4, page_size=2).get_json() == []


def test_search_never_shows_another_organizations_lines(client, org, other_org, logged):
    assert "rows secret" not in messages(client, org)
    assert messages(client, org, execution_id=logged["foreign"]) == []
    assert messages(client, other_org) == ["rows secret"]
    assert messages(client, other_org, execution_id=logged["first"]) == []
    assert messages(client, other_org, agent=logged["reporter_id"]) == []


def test_search_refuses_bad_filters(client, org, logged):
    for query in (
        {"level": "loud"},
        {"execution_id": "not-a-uuid"},
        {"since": "yesterday"},
        {"page_size": 101},
        {"q": ""},
        # A text search across executions reads at most RUNYARD_LOG_SEARCH_MAX_DAYS (7).
        {"q": "rows", "since": (NOW - dt.timedelta(days=30)).isoformat()},
    ):
        response = client.get("/api/v1/logs", query_string=query, headers=org.headers)
        assert response.status_code in (400, 422), (query, response.get_json())
        body = response.get_json()
        assert body["code"] == response.status_code and body["message"], body
    long_ago = NOW - dt.timedelta(days=30)
    window = {"since": long_ago.isoformat(), "until": (long_ago + dt.timedelta(days=7)).isoformat()}
    assert messages(client, org, q="rows", **window) == []
    assert messages(client, org, q="rows", execution_id=logged["first"], since=window["since"])
    assert client.get("/api/v1/logs").status_code == 401


# ---------------------------------------------------------------------------------------------
# Export

TRICKY = 'a, "quoted" value\nand a second line'


@pytest.fixture
def long_log(client, org, connection):
    """20,000 lines (more than four export pages), every seventh one with commas, quotes and a
    line break in its message, every third with fields."""
    make_agent(client, org)
    execution_id = new_execution(client, org)
    connection.execute(
        text(
            """
            INSERT INTO execution_logs
                (execution_id, seq, attempt, org_id, ts, level, message, fields)
            SELECT :id, i, 1, :org_id, now() + i * interval '1 millisecond',
                   CASE WHEN i % 2 = 0 THEN 20 ELSE 30 END,
                   CASE WHEN i % 7 = 0 THEN :tricky || ' ' || i ELSE 'line ' || i END,
                   CASE WHEN i % 3 = 0 THEN jsonb_build_object('i', i) END
            FROM generate_series(1, 20000) AS i
            """
        ),
        {"id": execution_id, "org_id": org.id, "tricky": TRICKY},
    )
    return execution_id


def expected_message(seq):
    return f"{TRICKY} {seq}" if seq % 7 == 0 else f"line {seq}"


def export(client, org, execution_id, fmt, **query):
    return client.get(
        f"/api/v1/executions/{execution_id}/logs",
        query_string={"format": fmt, **query},
        headers=org.headers,
    )


def test_ndjson_export_streams_every_line_in_order(client, org, long_log):
    response = export(client, org, long_log, "ndjson")
    # Streamed: no Content-Length, the body is written as the pages are read.
    assert response.status_code == 200 and "Content-Length" not in response.headers
    assert response.mimetype == "application/x-ndjson"
    assert response.headers["Content-Disposition"] == (
        f'attachment; filename="{long_log}-logs.ndjson"'
    )
    lines = [json.loads(raw) for raw in response.get_data(as_text=True).splitlines()]
    assert [line["seq"] for line in lines] == list(range(1, 20001))
    for line in lines:
        seq = line["seq"]
        assert line["message"] == expected_message(seq)
        assert line["fields"] == ({"i": seq} if seq % 3 == 0 else {})
        assert line["level"] == ("info" if seq % 2 == 0 else "warning")
        assert line["attempt"] == 1 and dt.datetime.fromisoformat(line["ts"])
    # The JSON array of the default format shows the same lines, without `format`.
    first = client.get(f"/api/v1/executions/{long_log}/logs?limit=3", headers=org.headers)
    shown = first.get_json()
    assert first.mimetype == "application/json" and len(shown) == 3
    assert "Content-Length" in first.headers
    assert [line | {"ts": None} for line in shown] == [line | {"ts": None} for line in lines[:3]]


def test_csv_export_quotes_commas_quotes_and_line_breaks(client, org, long_log):
    response = export(client, org, long_log, "csv")
    assert response.status_code == 200 and "Content-Length" not in response.headers
    assert response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"] == f'attachment; filename="{long_log}-logs.csv"'
    rows = list(csv.reader(io.StringIO(response.get_data(as_text=True), newline="")))
    assert rows[0] == ["seq", "ts", "level", "message", "fields", "attempt"]
    assert [int(row[0]) for row in rows[1:]] == list(range(1, 20001))
    for row in rows[1:]:
        seq = int(row[0])
        assert row[3] == expected_message(seq), row
        assert json.loads(row[4]) == ({"i": seq} if seq % 3 == 0 else {})
        assert row[2] == ("info" if seq % 2 == 0 else "warning") and row[5] == "1"


def test_export_keeps_the_filters_and_an_empty_log_is_a_header(client, org, long_log):
    response = export(client, org, long_log, "ndjson", q="quoted", after_seq=19000)
    seqs = [json.loads(raw)["seq"] for raw in response.get_data(as_text=True).splitlines()]
    assert seqs == [seq for seq in range(19001, 20001) if seq % 7 == 0]
    empty = new_execution(client, org)
    assert export(client, org, empty, "csv").get_data(as_text=True).splitlines() == [
        "seq,ts,level,message,fields,attempt"
    ]
    assert export(client, org, empty, "ndjson").get_data(as_text=True) == ""


def test_export_of_another_organizations_execution_is_404(client, org, other_org, long_log):
    for fmt in ("ndjson", "csv"):
        response = export(client, other_org, long_log, fmt)
        assert response.status_code == 404
        assert response.get_json()["code"] == 404
    assert export(client, org, uuid.uuid4(), "csv").status_code == 404
    assert export(client, org, long_log, "xml").status_code == 422


# ---------------------------------------------------------------------------------------------
# Retention


def finish(connection, execution_id, days_ago, status="succeeded"):
    connection.execute(
        text(
            "UPDATE executions SET status = :status, attempt = 1, "
            "finished_at = now() - make_interval(days => :days) WHERE id = :id"
        ),
        {"id": execution_id, "days": days_ago, "status": status},
    )


def existing(connection, ids):
    found = connection.execute(
        text("SELECT id::text FROM executions WHERE id = ANY(CAST(:ids AS uuid[]))"),
        {"ids": list(ids)},
    ).scalars()
    return set(found)


def set_retention(org, days):
    with db.session() as session:
        flow.set_limits(session, org.name, {"retention_days": days})
        session.commit()


def test_retention_deletes_only_old_finished_executions(client, org, connection):
    make_agent(client, org)
    ids = {name: new_execution(client, org) for name in ("old", "failed", "recent", "queued")}
    ids["running"] = new_execution(client, org)
    finish(connection, ids["old"], 31)
    finish(connection, ids["failed"], 45, status="failed")
    finish(connection, ids["recent"], 29)
    connection.execute(
        text("UPDATE executions SET status = 'running', attempt = 1 WHERE id = :id"),
        {"id": ids["running"]},
    )
    add_lines(connection, org, ids["old"], [(1, NOW, 20, "goes too", None)])
    connection.execute(
        text(
            "INSERT INTO execution_attempts (execution_id, attempt, status, finished_at) "
            "VALUES (:id, 1, 'succeeded', now())"
        ),
        {"id": ids["old"]},
    )
    assert maintenance.apply_retention() >= 2
    assert existing(connection, ids.values()) == {ids["recent"], ids["queued"], ids["running"]}
    leftovers = connection.execute(
        text(
            "SELECT (SELECT count(*) FROM execution_logs WHERE execution_id = :id) "
            "+ (SELECT count(*) FROM execution_attempts WHERE execution_id = :id)"
        ),
        {"id": ids["old"]},
    ).scalar()
    assert leftovers == 0
    assert client.get(f"/api/v1/executions/{ids['old']}", headers=org.headers).status_code == 404


def test_retention_runs_in_batches(client, org, connection):
    make_agent(client, org)
    ids = [new_execution(client, org) for _ in range(5)]
    for execution_id in ids:
        finish(connection, execution_id, 40)
    with db.begin() as conn:
        assert store.delete_expired(conn, 30, 2) == 2, "one statement deletes one batch"
    assert len(existing(connection, ids)) == 3
    assert maintenance.apply_retention(batch=2) >= 3
    assert existing(connection, ids) == set()
    # An exhausted budget stops between batches: what is left waits for the next run.
    more = [new_execution(client, org) for _ in range(3)]
    for execution_id in more:
        finish(connection, execution_id, 40)
    assert maintenance.apply_retention(budget_seconds=0) == 0
    assert existing(connection, more) == set(more)


def test_retention_follows_the_organizations_override(client, org, other_org, connection):
    make_agent(client, org)
    make_agent(client, other_org)
    mine, theirs = new_execution(client, org), new_execution(client, other_org)
    finish(connection, mine, 5)
    finish(connection, theirs, 5)
    set_retention(org, 3)
    maintenance.apply_retention()
    assert existing(connection, [mine, theirs]) == {theirs}, "the default 30 days for the other"
    set_retention(other_org, 60)
    kept = new_execution(client, other_org)
    finish(connection, kept, 45)
    maintenance.apply_retention()
    assert existing(connection, [theirs, kept]) == {theirs, kept}
    set_retention(other_org, None)
    maintenance.apply_retention()
    assert existing(connection, [theirs, kept]) == {theirs}


def test_retention_takes_chain_steps_only_with_their_finished_chain(client, org, connection):
    from tests.app.test_chains_api import CHAIN, create, make_agents

    make_agents(client, org)
    assert create(client, org, CHAIN).status_code == 201
    make_agent(client, org)
    chain = client.post(
        "/api/v1/chains/sums/executions", json={"input": {"value": 1}}, headers=org.headers
    ).get_json()["id"]
    done, running = new_execution(client, org), new_execution(client, org)
    for step in (done, running):
        connection.execute(
            text("UPDATE executions SET chain_execution_id = :chain WHERE id = :id"),
            {"chain": chain, "id": step},
        )
    finish(connection, done, 40)
    connection.execute(
        text("UPDATE executions SET status = 'running', attempt = 1 WHERE id = :id"),
        {"id": running},
    )

    def chain_exists():
        return connection.execute(
            text("SELECT count(*) FROM chain_executions WHERE id = :id"), {"id": chain}
        ).scalar()

    maintenance.apply_retention()
    assert existing(connection, [done, running]) == {done, running}, "its chain is running"
    connection.execute(
        text(
            "UPDATE chain_executions SET status = 'failed', "
            "finished_at = now() - interval '40 days' WHERE id = :id"
        ),
        {"id": chain},
    )
    maintenance.apply_retention()
    assert chain_exists() and existing(connection, [done, running]) == {done, running}, (
        "a step still runs"
    )
    finish(connection, running, 40, status="cancelled")
    maintenance.apply_retention()
    assert not chain_exists() and existing(connection, [done, running]) == set()


# ---------------------------------------------------------------------------------------------
# The worker's write


def test_a_batch_is_fenced_by_its_attempt_and_a_line_written_twice_is_kept_once(
    client, org, connection
):
    make_agent(client, org)
    execution_id = uuid.UUID(new_execution(client, org))
    connection.execute(
        text("UPDATE executions SET status = 'running', attempt = 2 WHERE id = :id"),
        {"id": execution_id},
    )

    def batch(attempt, seqs):
        return store.LogLines(
            execution_id,
            attempt,
            list(seqs),
            [NOW] * len(seqs),
            [20] * len(seqs),
            [f"attempt {attempt} line {seq}" for seq in seqs],
            ['{"a": 1}' if seq == 1 else None for seq in seqs],
        )

    store.write_logs(connection, batch(2, [1, 2]))
    store.write_logs(connection, batch(2, [1, 2, 3]))  # a retried flush: 1 and 2 are kept once
    store.write_logs(connection, batch(1, [4]))  # a stale attempt: dropped
    rows = connection.execute(
        text(
            "SELECT seq, attempt, org_id, message, fields FROM execution_logs "
            "WHERE execution_id = :id ORDER BY seq"
        ),
        {"id": execution_id},
    ).all()
    assert [(row.seq, row.attempt, row.org_id, row.message) for row in rows] == [
        (seq, 2, org.id, f"attempt 2 line {seq}") for seq in (1, 2, 3)
    ]
    assert rows[0].fields == {"a": 1} and rows[1].fields is None
