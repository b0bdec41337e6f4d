"""CPU accounting and the tables of bench/hosts.py: every process's CPU seconds from /proc,
grouped by role (the API, the workers' main and pool processes, PostgreSQL, Redis, RabbitMQ,
the socat forwarders, the client, kernel threads, everything else), per item measured."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")

GROUPS = (
    "api",
    "worker main",
    "worker pool",
    "postgres",
    "redis",
    "rabbitmq",
    "socat",
    "client",
    "kernel",
    "other",
)
PF_KTHREAD = 0x00200000
RABBITMQ_PROCESSES = ("beam.smp", "erl_child_setup", "inet_gethost", "epmd")
# A backend's title: "postgres: [cluster: ]user database host(port) activity".
BACKEND_TITLE = re.compile(r"^postgres: (?:\S+: )?\S+ (\S+) (?:\S+\(\d+\)|\[local\])")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ---------------------------------------------------------------------------------------------
# CPU from /proc, grouped by role


def snapshot() -> dict:
    """pid -> (comm, session, cpu seconds, the database of a PostgreSQL backend or "kernel
    thread", start time), and the machine's busy seconds."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
            comm = raw[raw.index("(") + 1 : raw.rindex(")")]
            database = ""
            if comm == "postgres":
                title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode()
                found = BACKEND_TITLE.match(title)
                database = found.group(1) if found else ""
        except (OSError, ValueError):
            continue  # gone meanwhile
        fields = raw[raw.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        if int(fields[6]) & PF_KTHREAD:
            database = "kernel thread"
        # The start time (field 22) tells a reused pid apart; the name does not (a kworker's
        # changes with its work).
        procs[int(entry)] = (comm, int(fields[3]), cpu, database, int(fields[19]))
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return {"procs": procs, "machine": (sum(values[:8]) - values[3] - values[4]) / TICK}


def group_of(pid: int, proc: tuple, api: int, workers: set[int], database_name: str) -> str:
    comm, session, _, database, _ = proc
    if session == api:
        return "api"
    if session in workers:
        return "worker main" if pid == session else "worker pool"
    if database == "kernel thread":
        return "kernel"
    if comm == "postgres":
        return "postgres" if database in ("", database_name) else "other"
    if comm.startswith("redis-server"):
        return "redis"
    if comm in RABBITMQ_PROCESSES:
        return "rabbitmq"
    if comm == "socat":
        return "socat"
    return "client" if pid == os.getpid() else "other"


@dataclass
class Cpu:
    """CPU ms per item by group, the busiest process (% of one core) and the machine."""

    per_item: dict[str, float]
    busiest: tuple[str, float]
    machine_ms: float
    busy_percent: float


def cpu_between(
    before: dict, after: dict, sessions: tuple[int, set[int]], database: str, n: int, wall: float
) -> Cpu:
    """CPU per item between two snapshots; `sessions`: the API's session (-1: none) and the
    workers' sessions; `database`: the one whose PostgreSQL backends count as ours."""
    api, workers = sessions
    spent = dict.fromkeys(GROUPS, 0.0)
    busiest = ("none", 0.0)
    for pid, proc in after["procs"].items():
        old = before["procs"].get(pid)
        seconds = proc[2] - (old[2] if old and old[4] == proc[4] else 0.0)
        group = group_of(pid, proc, api, workers, database)
        spent[group] += seconds
        if group != "other" and seconds > busiest[1]:
            busiest = (f"{group} ({proc[0]} {pid})", seconds)
    machine = after["machine"] - before["machine"]
    return Cpu(
        {group: seconds * 1000 / n for group, seconds in spent.items()},
        (busiest[0], busiest[1] / wall * 100),
        machine * 1000 / n,
        machine / (wall * (os.cpu_count() or 1)) * 100,
    )


@dataclass
class Row:
    broker: str
    hosts: int
    system: str
    rate: float = 0.0
    submit_rate: float = 0.0
    cpu: Cpu | None = None
    error: str = ""
    load: str = field(default_factory=loadavg)


def own_ms(cpu: Cpu) -> float:
    """CPU ms per item of the processes the phase ran on (every group but `other`)."""
    return sum(ms for group, ms in cpu.per_item.items() if group != "other")


def tables(rows: list[Row]) -> list[str]:
    lines = ["", "throughput (items/s, first submit -> last end):"]
    lines.append(f"{'broker':<9} {'hosts':>5} {'runyard':>8} {'plain':>8} {'ratio':>6}  load")
    pairs: dict[tuple[str, int], dict[str, Row]] = {}
    for row in rows:
        pairs.setdefault((row.broker, row.hosts), {})[row.system] = row
    for (broker, hosts), pair in pairs.items():
        ours, theirs = pair.get("runyard"), pair.get("plain celery")
        shown = [f"{r.rate:8.1f}" if r and not r.error else f"{'n/a':>8}" for r in (ours, theirs)]
        ratio = f"{ours.rate / theirs.rate:6.2f}" if ours and theirs and theirs.rate else "   n/a"
        load = ", ".join(r.load for r in (ours, theirs) if r)
        lines.append(f"{broker:<9} {hosts:>5} {shown[0]} {shown[1]} {ratio}  {load}")
    lines += ["", "cpu ms per item, by process group over the measured window:"]
    heads = "".join(f"{g.replace('worker ', 'w-'):>9}" for g in GROUPS)
    lines.append(
        f"{'broker':<9}{'hosts':>5} {'system':<13}{heads}{'own':>7}{'machine':>9}{'busy':>6}  "
        "busiest"
    )
    for row in rows:
        label = f"{row.broker:<9}{row.hosts:>5} {row.system:<13}"
        if row.cpu is None:
            lines.append(f"{label}FAILED: {row.error}")
            continue
        cells = "".join(f"{row.cpu.per_item[g]:9.2f}" for g in GROUPS)
        who, percent = row.cpu.busiest
        lines.append(
            f"{label}{cells}{own_ms(row.cpu):7.2f}{row.cpu.machine_ms:9.2f}"
            f"{row.cpu.busy_percent:5.0f}%  {who} {percent:.0f}% of a core"
        )
    return lines + capacity(rows)


def capacity(rows: list[Row]) -> list[str]:
    cores = os.cpu_count() or 1
    lines = [
        "",
        "capacity: one core's 1000 ms over the ms per execution of each (runyard rows), and "
        f"the {cores} cores over `own`:",
    ]
    for row in rows:
        if row.system != "runyard" or row.cpu is None:
            continue
        cpu = row.cpu.per_item
        rates = {
            "postgres": cpu["postgres"],
            "broker (redis+rabbitmq)": cpu["redis"] + cpu["rabbitmq"],
            "api": cpu["api"],
            "workers": cpu["worker main"] + cpu["worker pool"],
        }
        shown = ", ".join(f"{name} {1000 / max(ms, 1e-3):.0f}/s" for name, ms in rates.items())
        alone = cores * 1000 / max(own_ms(row.cpu), 1e-3)
        lines.append(f"{row.broker:<9}{row.hosts:>5}  {shown}; {cores} cores alone {alone:.0f}/s")
    return lines
