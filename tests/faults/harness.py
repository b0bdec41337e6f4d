"""What a fault cost: executions lost and duplicated, and how long the platform took to recover.

- lost: an accepted execution (the API answered 202) that did not end `succeeded` within the
  bound (every fault test runs an agent that always succeeds when left alone).
- duplicated: a result committed more than once (a second write of a terminal status to the same
  execution, counted by a trigger on `executions`), or, where no worker was killed, the agent's
  work run to its end more than once (the `tests.agents:ledger` agent appends a line each time).
  Where a worker is killed mid-run a rerun of the killed attempt is expected: it is reported as
  `reruns`, apart from duplicates.
- recovery: from the moment the fault was injected to the moment the last execution ended.
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg

TERMINAL = ("succeeded", "failed", "timed_out", "cancelled")

# Test instrumentation, not product code: every write that puts an execution in a terminal status.
AUDIT_DDL = """
CREATE TABLE IF NOT EXISTS fault_terminal_writes (
    execution_id uuid NOT NULL,
    status text NOT NULL,
    written_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION fault_audit_terminal() RETURNS trigger AS $$
BEGIN
    INSERT INTO fault_terminal_writes (execution_id, status) VALUES (NEW.id, NEW.status);
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS fault_audit_terminal ON executions;
CREATE TRIGGER fault_audit_terminal AFTER UPDATE OF status ON executions
FOR EACH ROW WHEN (NEW.status IN ('succeeded', 'failed', 'timed_out', 'cancelled'))
EXECUTE FUNCTION fault_audit_terminal();
"""

AUDIT_DROP = """
DROP TRIGGER IF EXISTS fault_audit_terminal ON executions;
DROP FUNCTION IF EXISTS fault_audit_terminal();
DROP TABLE IF EXISTS fault_terminal_writes;
"""

LEDGER_AGENT = {
    "runtime": {"type": "python", "entrypoint": "tests.agents:ledger"},
    "input_schema": {"type": "object"},
    "output_schema": {"type": "object"},
    # A killed attempt is run again: what the agent does is safe to repeat.
    "retry": {"max_retries": 5, "backoff_seconds": 0, "retry_on": ["lost"]},
}


def psycopg_dsn(database_url: str) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def install_audit(database_url: str) -> None:
    with psycopg.connect(psycopg_dsn(database_url), autocommit=True) as conn:
        conn.execute(AUDIT_DDL)


def remove_audit(database_url: str) -> None:
    with psycopg.connect(psycopg_dsn(database_url), autocommit=True) as conn:
        conn.execute(AUDIT_DROP)


@dataclass
class FaultReport:
    name: str
    accepted: int
    lost: int
    duplicated: int
    reruns: int
    recovery_seconds: float
    details: dict = field(default_factory=dict)
    # Measured durations worth printing beside the counts (the outage tests' response times).
    timings: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        measured = "".join(f" {name}={seconds:.2f}s" for name, seconds in self.timings.items())
        return (
            f"{self.name}: accepted={self.accepted} lost={self.lost} "
            f"duplicated={self.duplicated} reruns={self.reruns} "
            f"recovery={self.recovery_seconds:.1f}s{measured}"
        )


REPORTS: list[FaultReport] = []


def wait_until_ended(database_url: str, ids: list[uuid.UUID], timeout: float) -> float:
    """Seconds until every execution is terminal (or the timeout, whichever comes first)."""
    started = time.monotonic()
    with psycopg.connect(psycopg_dsn(database_url), autocommit=True) as conn:
        while time.monotonic() - started < timeout:
            open_count = conn.execute(
                "SELECT count(*) FROM executions WHERE id = ANY(%s) AND status <> ALL(%s)",
                (ids, list(TERMINAL)),
            ).fetchone()[0]
            if open_count == 0:
                break
            time.sleep(0.2)
    return time.monotonic() - started


def tally(
    name: str,
    database_url: str,
    ids: list[uuid.UUID],
    ledger_path: Path,
    recovery_seconds: float,
    *,
    workers_killed: bool,
    **details,
) -> FaultReport:
    """Count what the fault cost and keep the report for the end-of-run summary."""
    with psycopg.connect(psycopg_dsn(database_url), autocommit=True) as conn:
        statuses = dict(
            conn.execute("SELECT id, status FROM executions WHERE id = ANY(%s)", (ids,)).fetchall()
        )
        writes = dict(
            conn.execute(
                "SELECT execution_id, count(*) FROM fault_terminal_writes "
                "WHERE execution_id = ANY(%s) GROUP BY execution_id",
                (ids,),
            ).fetchall()
        )
    # This fault's executions only: the ledger file is the stack's, shared by its tests.
    counted = {str(execution_id) for execution_id in ids}
    lines = ledger_path.read_text().splitlines() if ledger_path.exists() else []
    runs = collections.Counter(
        first[0] for first in (line.split()[:1] for line in lines) if first and first[0] in counted
    )
    lost = sum(1 for execution_id in ids if statuses.get(execution_id) != "succeeded")
    committed_twice = sum(count - 1 for count in writes.values() if count > 1)
    ran_again = sum(count - 1 for count in runs.values() if count > 1)
    report = FaultReport(
        name=name,
        accepted=len(ids),
        lost=lost,
        duplicated=committed_twice + (0 if workers_killed else ran_again),
        reruns=ran_again if workers_killed else 0,
        recovery_seconds=recovery_seconds,
        details={
            # A plain dict: dataclasses.asdict rebuilds a Counter from (key, count) pairs,
            # counting the pairs, and the report file then fails on tuple keys.
            "not_succeeded": dict(
                collections.Counter(
                    statuses.get(execution_id, "missing")
                    for execution_id in ids
                    if statuses.get(execution_id) != "succeeded"
                )
            ),
            **details,
        },
    )
    REPORTS.append(report)
    return report


def write_reports(path: Path) -> None:
    path.write_text(json.dumps([asdict(report) for report in REPORTS], indent=2, default=str))
