#!/usr/bin/env python
"""What the audit trail costs a submit: the submit's one statement with and without its event.

    .venv/bin/python bench/audit.py [--count 5000] [--rounds 5] [--threads 1]

A fresh database (`runyard_bench_audit`, as bench/throughput.py makes it), one organization and
a no-op agent. Then --rounds rounds, each inserting --count executions through
app.executions.entries.insert (the statement an API submit runs, on an autocommit connection,
one round trip per execution) twice: once plain, once with the audit event the API writes in
the same statement (an unsealed audit_events row). --threads client threads share each half.
Prints the median per-statement wall time of each, the difference (the event's cost per
submit) and the rate of each; then the time beat's sealer takes to number and hash all those
events (off the submit's path); then checks that the audited inserts left a chain that
`verify` accepts, with one event per audited insert.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import create_org, setup_database  # noqa: E402

DATABASE = "runyard_bench_audit"


class Caller:
    """What audit.Actor.of reads: the shape of a token's principal."""

    def __init__(self, org_id: uuid.UUID) -> None:
        self.org_id = org_id
        self.token_id = uuid.uuid4()
        self.token_name = "bench"
        self.role = "admin"


def _agent(org_id: uuid.UUID):
    from app.agents import services as agents
    from app.db import db
    from app.executions.versions import specs
    from app.orgs.services import Principal

    principal = Principal(org_id, "bench", uuid.uuid4(), "bench", "admin")
    with db.session() as session:
        agent = agents.create(
            session,
            principal,
            {
                "name": "noop",
                "runtime": {"type": "python", "entrypoint": "runyard_examples.text:echo"},
            },
        )
        session.commit()
        version_id = agent.current_version_id
    with db.hot() as conn:
        return specs.get(conn, version_id)


def _insert_many(spec, org_id, count: int, threads: int, audited: bool) -> float:
    """Seconds for `count` inserts over `threads` threads."""
    from app.audit import services as audit
    from app.db import db
    from app.executions import entries

    actor = audit.Actor.of(Caller(org_id))
    created_by = audit.created_by(Caller(org_id))

    def run(share: int) -> None:
        for _ in range(share):
            execution_id = uuid.uuid4()
            with db.hot() as conn:
                entries.insert(
                    conn,
                    execution_id,
                    org_id,
                    spec,
                    {},
                    priority=5,
                    pinned=False,
                    created_by=created_by,
                    audited=audit.prepare(
                        actor, audit.Change("execution.submit", "execution", execution_id, "noop")
                    )
                    if audited
                    else None,
                )

    shares = [count // threads + (1 if n < count % threads else 0) for n in range(threads)]
    workers = [threading.Thread(target=run, args=(share,)) for share in shares]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="inserts per half-round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep-db", action="store_true")
    args = parser.parse_args(argv)

    from app.audit import services as audit
    from app.db import db

    cleanups: list = []
    try:
        url = setup_database(cleanups, args.keep_db, DATABASE)
        org_id = uuid.UUID(create_org(url)[0])
        db.configure(url)
        spec = _agent(org_id)
        _insert_many(spec, org_id, 200, args.threads, audited=True)  # warm-up
        plain, audited = [], []
        for number in range(args.rounds):
            # Alternating the order spreads whatever the machine does meanwhile over both.
            for kind in (False, True) if number % 2 == 0 else (True, False):
                seconds = _insert_many(spec, org_id, args.count, args.threads, audited=kind)
                (audited if kind else plain).append(seconds / args.count * 1e6)
        plain_us, audited_us = statistics.median(plain), statistics.median(audited)
        for label, micros in (("plain", plain_us), ("audited", audited_us)):
            print(f"submit statement, {label + ':':<9} {micros:8.1f} us ({1e6 / micros:,.0f}/s)")
        print(
            f"the audit event costs {audited_us - plain_us:+.1f} us of wall time per submit "
            f"({(audited_us / plain_us - 1) * 100:+.1f}%), {args.threads} thread(s), median of "
            f"{args.rounds} rounds of {args.count}"
        )
        # What beat's sealer pays for them, off the submit's path: numbering and hashing.
        started = time.perf_counter()
        sealed = audit.seal_now(org_id)
        seconds = time.perf_counter() - started
        each = seconds / sealed * 1e6
        print(f"sealing (beat): {sealed} events in {seconds:.2f} s, {each:.1f} us each")
        with db.session() as session:
            verdict = audit.verify(session, org_id)
        expected = 2 + 200 + args.rounds * args.count  # org.create, agent.create, warm-up
        if verdict.bad_seq is not None or verdict.count != expected:
            print(f"chain check FAILED: {verdict} (expected {expected} events)")
            return 1
        print(f"chain check: {verdict.count} events, verify holds")
        return 0
    finally:
        db.dispose()
        for cleanup in reversed(cleanups):
            cleanup()


if __name__ == "__main__":
    sys.exit(main())
