"""Three worker hosts (network namespaces, tests/hosts/netns.py), each running one Celery worker
with short leases, and a beat running the sweeper in the root namespace, for the module.

The workers reach PostgreSQL, Redis and the broker the test session uses (RUNYARD_BROKER_URL:
Redis or RabbitMQ) through the socat forwarders on their host's veth. Each serves the module's
shared queue and a queue of its host's own (to give one host work on purpose).

Skipped, saying why, where network namespaces cannot be made (not root, no `ip` or `socat`);
with RUNYARD_REQUIRE_HOSTS=1 (CI) that is a failure instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.config import current_config
from tests.conftest import ROOT, RUN_ID, own_queue
from tests.faults.harness import REPORTS, install_audit, remove_audit
from tests.faults.workers_fixtures import SHORT_LEASES, sweeping_beat
from tests.hosts import netns

HOSTS = 3
PROCESSES_PER_WORKER = 2
READY = b" ready."


@dataclass
class WorkerHosts:
    fleet: netns.Fleet
    queue: str
    directory: Path
    workers: dict[int, subprocess.Popen] = field(default_factory=dict)
    starts: dict[int, int] = field(default_factory=dict)

    @property
    def hosts(self) -> list[netns.Host]:
        return self.fleet.hosts

    def node(self, host: netns.Host) -> str:
        """The worker's node name prefix, as recorded in executions.worker at claim."""
        return f"host{host.index}-{RUN_ID}@"

    def host_of(self, worker: str | None) -> int | None:
        """The index of the host whose worker claimed (executions.worker), or None."""
        match = re.match(rf"^host(\d+)-{RUN_ID}@", worker or "")
        return int(match.group(1)) if match else None

    def own_queue(self, host: netns.Host) -> str:
        return f"{self.queue}-h{host.index}"

    def log_path(self, host: netns.Host) -> Path:
        return self.directory / f"host{host.index}-{self.starts.get(host.index, 0)}.log"

    def start_workers(self, hosts: list[netns.Host]) -> None:
        """One worker in each host, started together; back when every one is ready."""
        for host in hosts:
            self.starts[host.index] = self.starts.get(host.index, 0) + 1
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),  # tests.agents in the pool processes
                **SHORT_LEASES,
                **self.fleet.env(host),
            }
            argv = netns.celery_worker_argv(
                "workers",
                f"{self.queue},{self.own_queue(host)}",
                PROCESSES_PER_WORKER,
                f"{self.node(host)}%h",
            )
            self.workers[host.index] = netns.start_in_host(host, argv, self.log_path(host), env)
        for host in hosts:
            netns.wait_ready(self.workers[host.index], self.log_path(host), READY)

    def ensure_workers(self) -> None:
        """Every host up with a live worker (a test before may have killed one, or cut it)."""
        for host in self.hosts:
            host.reconnect()
        self.start_workers([h for h in self.hosts if self.workers[h.index].poll() is not None])

    def stop(self) -> None:
        # Every warm shutdown at once, then each waited for (and killed past the timeout).
        for process in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.workers.values():
            netns.stop_process(process, timeout=10)


def hosts_unavailable() -> str | None:
    reason = netns.unavailable_reason()
    if reason and os.environ.get("RUNYARD_REQUIRE_HOSTS") == "1":
        pytest.fail(f"RUNYARD_REQUIRE_HOSTS=1 but {reason}")
    return reason


@pytest.fixture(scope="module")
def worker_hosts(app, database_url, tmp_path_factory) -> Iterator[WorkerHosts]:
    reason = hosts_unavailable()
    if reason:
        pytest.skip(reason)
    config = current_config()
    services = {
        "DATABASE_URL": database_url,
        "REDIS_URL": config.redis_url,
        "RUNYARD_BROKER_URL": config.broker_url,
        "RUNYARD_RESULT_BACKEND": config.result_backend,
    }
    directory = tmp_path_factory.mktemp("hosts")
    install_audit(database_url)
    try:
        with netns.Fleet(HOSTS, services) as fleet, sweeping_beat(directory):
            fleet_workers = WorkerHosts(fleet, own_queue("hosts"), directory)
            try:
                fleet_workers.start_workers(fleet.hosts)
                yield fleet_workers
            finally:
                fleet_workers.stop()
                if config.broker_url.startswith("amqp"):
                    delete_queues([fleet_workers.queue, *map(fleet_workers.own_queue, fleet.hosts)])
    finally:
        remove_audit(database_url)


def delete_queues(names: list[str]) -> None:
    """RabbitMQ keeps a queue after its last consumer (a Redis database is flushed at the end
    of the run instead)."""
    from app.broker import celery_app

    with celery_app.connection_for_write() as connection:
        for name in names:
            with contextlib.suppress(Exception):
                connection.default_channel.queue_delete(name)


@pytest.fixture
def hosts(worker_hosts) -> WorkerHosts:
    worker_hosts.ensure_workers()
    return worker_hosts


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # When the fault suite runs in the same session, its summary lists these reports too.
    faults = Path(__file__).parent.parent / "faults" / "conftest.py"
    if any(getattr(p, "__file__", None) == str(faults) for p in config.pluginmanager.get_plugins()):
        return
    mine = [report for report in REPORTS if report.name.startswith("hosts:")]
    if mine:
        terminalreporter.section("worker hosts: executions lost and duplicated")
        for report in mine:
            terminalreporter.write_line(report.line())
