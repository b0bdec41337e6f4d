"""Worker hosts on one machine: each a Linux network namespace joined to the root namespace by a
veth pair, reaching PostgreSQL and the brokers only through socat forwarders on the host side.

A host gets the /30 10.213.X.0/30 (X from 1 to 254, the first free one, chosen under a file lock
so that parallel runs do not collide): 10.213.X.1 on the host-side veth, in the root namespace,
and 10.213.X.2 inside. The namespace has no default route, so its processes can reach that one
address and nothing else. The services listen on loopback only: for each service URL the fleet
starts a socat listening on 10.213.X.1 at the service's port that connects to 127.0.0.1 (or to
the unix socket an embedded PostgreSQL listens on), and rewrites the URL the host's processes
get to point at 10.213.X.1.

Used by tests/hosts (pytest) and bench/hosts.py, so nothing here imports pytest. Everything is
named after the owning process (`ryh-<pid>-<n>`, veth `ryh<pid>h<n>`): a run cleans up what it
made in every case it can (a `with` block, atexit), and the next run removes what a run killed
outright left behind (its pid is gone). The socats ask the kernel to kill them when their
owner dies (PR_SET_PDEATHSIG), so a killed run leaves none listening.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

SUBNET = "10.213"
MAX_HOSTS = 8
LOCK_PATH = Path("/tmp/runyard-hosts.lock")
NAMESPACE = re.compile(r"^ryh-(\d+)-(\d+)$")
HOST_VETH = re.compile(r"^ryh(\d+)h(\d+)$")
LOOPBACK = {"127.0.0.1", "localhost"}
COMMAND_SECONDS = 10.0


class HostsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no `ip` or `socat`, no permission)."""


def run_ip(*args: str, namespace: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(("netns", "exec", namespace, "ip") if namespace else ()), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_SECONDS)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def unavailable_reason() -> str | None:
    """Why worker hosts cannot be made here, or None when they can (tried for real)."""
    if os.geteuid() != 0:
        return "worker hosts are network namespaces: `ip netns add` needs root"
    for program in ("ip", "socat"):
        if shutil.which(program) is None:
            return f"worker hosts need `{program}` (iproute2, socat), which is not installed"
    probe = f"ryh-{os.getpid()}-0"
    try:
        run_ip("netns", "add", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        return f"network namespaces are not available here: {error}"
    run_ip("netns", "del", probe, check=False)
    return None


# ---------------------------------------------------------------------------------------------
# Leftovers of runs that died


def _alive(pid: int) -> bool:
    return pid == os.getpid() or Path(f"/proc/{pid}").exists()


def namespace_pids(namespace: str) -> list[int]:
    out = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=COMMAND_SECONDS
    ).stdout
    return [int(pid) for pid in out.split()]


def kill_namespace_processes(namespace: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process in the namespace until none is left; the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while pids := namespace_pids(namespace):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.extend(pid for pid in pids if pid not in killed)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {namespace} outlived SIGKILL: {pids}")
        time.sleep(0.05)
    return killed


def remove_stale() -> list[str]:
    """Remove the namespaces and veths of runs whose process is gone; what was removed."""
    removed = []
    for line in run_ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        match = NAMESPACE.match(name)
        if match and not _alive(int(match.group(1))):
            kill_namespace_processes(name)
            run_ip("netns", "del", name, check=False)
            removed.append(name)
    for line in run_ip("-o", "link", "show", check=False).splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        match = HOST_VETH.match(name)
        if match and not _alive(int(match.group(1))):
            run_ip("link", "del", name, check=False)
            removed.append(name)
    return removed


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    with open(LOCK_PATH, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _subnets_in_use() -> set[int]:
    used = set()
    for found in re.finditer(rf"inet {re.escape(SUBNET)}\.(\d+)\.", run_ip("-o", "-4", "addr")):
        used.add(int(found.group(1)))
    return used


# ---------------------------------------------------------------------------------------------
# Forwarding the services


@dataclass(frozen=True)
class Target:
    """Where a forwarded port leads: a TCP port on loopback, or a unix socket."""

    port: int
    unix_socket: str = ""

    @property
    def socat_address(self) -> str:
        if self.unix_socket:
            return f"UNIX-CONNECT:{self.unix_socket}"
        return f"TCP:127.0.0.1:{self.port}"


def forwarded(url: str, address: str) -> tuple[str, Target | None]:
    """The URL a process inside a host uses for a service at `url`, and what must be forwarded
    for it (None: nothing, the URL names no server on this machine's loopback)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    socket_dir = (query.get("host") or [""])[0]
    if not parts.hostname and socket_dir.startswith("/"):
        # An embedded PostgreSQL on a unix socket (pgserver): forward its .s.PGSQL.<port>.
        port = int((query.get("port") or ["5432"])[0])
        rest = {key: value for key, value in query.items() if key not in ("host", "port")}
        target = Target(port, f"{socket_dir}/.s.PGSQL.{port}")
        netloc = f"{parts.netloc.rstrip('@')}@{address}:{port}".lstrip("@")
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(rest, doseq=True))), target
    if parts.hostname not in LOOPBACK:
        return url, None
    port = parts.port or {"redis": 6379, "amqp": 5672, "pyamqp": 5672}.get(
        parts.scheme.split("+")[0], 5432
    )
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{address}:{port}" if userinfo else f"{address}:{port}"
    return urlunsplit(parts._replace(netloc=netloc)), Target(port)


def _die_with_owner() -> None:
    # PR_SET_PDEATHSIG = 1: the kernel SIGKILLs the socat when the process that started it dies.
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Hosts


@dataclass
class Host:
    index: int
    subnet: int
    owner: int = field(default_factory=os.getpid)
    forwarders: list[subprocess.Popen] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return f"ryh-{self.owner}-{self.index}"

    @property
    def veth(self) -> str:
        """The host-side end, in the root namespace."""
        return f"ryh{self.owner}h{self.index}"

    @property
    def peer(self) -> str:
        return f"ryh{self.owner}n{self.index}"

    @property
    def gateway(self) -> str:
        """The host-side address: where the services are forwarded."""
        return f"{SUBNET}.{self.subnet}.1"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.subnet}.2"

    def argv(self, argv: list[str]) -> list[str]:
        """`argv` run inside the host."""
        return ["ip", "netns", "exec", self.namespace, *map(str, argv)]

    def pids(self) -> list[int]:
        return namespace_pids(self.namespace)

    def kill_everything(self) -> list[int]:
        """SIGKILL every process of the host at once (a lost machine); the pids killed."""
        return kill_namespace_processes(self.namespace)

    def cut(self) -> None:
        """Take the link down on the host side: the host's processes run on, unreachable."""
        run_ip("link", "set", self.veth, "down")

    def reconnect(self) -> None:
        run_ip("link", "set", self.veth, "up")

    def create(self) -> None:
        run_ip("netns", "add", self.namespace)
        run_ip("link", "add", self.veth, "type", "veth", "peer", "name", self.peer)
        run_ip("link", "set", self.peer, "netns", self.namespace)
        run_ip("addr", "add", f"{self.gateway}/30", "dev", self.veth)
        run_ip("link", "set", self.veth, "up")
        run_ip("link", "set", "lo", "up", namespace=self.namespace)
        run_ip("addr", "add", f"{self.address}/30", "dev", self.peer, namespace=self.namespace)
        run_ip("link", "set", self.peer, "up", namespace=self.namespace)

    def forward(self, port: int, target: Target) -> None:
        process = subprocess.Popen(
            [
                "socat",
                f"TCP-LISTEN:{port},bind={self.gateway},reuseaddr,fork",
                target.socat_address,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_owner,
        )
        self.forwarders.append(process)
        self._wait_listening(port, process)

    def _wait_listening(self, port: int, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + COMMAND_SECONDS
        while True:
            with contextlib.suppress(OSError), socket.create_connection((self.gateway, port), 1):
                return
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"socat did not listen on {self.gateway}:{port}")
            time.sleep(0.02)

    def destroy(self) -> None:
        """Every process inside killed, the forwarders stopped, the namespace and veth gone."""
        with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
            kill_namespace_processes(self.namespace)
        for process in self.forwarders:
            # The forwarder and the children it forked for each connection share its group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.forwarders.clear()
        run_ip("netns", "del", self.namespace, check=False)
        run_ip("link", "del", self.veth, check=False)


class Fleet:
    """`count` hosts, each forwarding the services named by `service_urls` (name -> URL)."""

    def __init__(self, count: int, service_urls: dict[str, str]) -> None:
        if not 1 <= count <= MAX_HOSTS:
            raise ValueError(f"1 to {MAX_HOSTS} hosts, not {count}")
        self.count = count
        self.service_urls = service_urls
        self.hosts: list[Host] = []

    def __enter__(self) -> Fleet:
        # A run ended by SIGTERM or a timeout (no `with` exit) still removes its hosts.
        atexit.register(self.close)
        try:
            with _allocation_lock():
                remove_stale()
                used = _subnets_in_use()
                free = [n for n in range(1, 255) if n not in used][: self.count]
                for index, subnet in enumerate(free, start=1):
                    host = Host(index, subnet)
                    self.hosts.append(host)
                    host.create()
            for host in self.hosts:
                targets = {t for _, t in self._urls_for(host).values() if t is not None}
                for target in sorted(targets, key=lambda t: t.port):
                    host.forward(target.port, target)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
        atexit.unregister(self.close)

    def close(self) -> None:
        for host in reversed(self.hosts):
            host.destroy()
        self.hosts.clear()

    def _urls_for(self, host: Host) -> dict[str, tuple[str, Target | None]]:
        return {
            name: forwarded(url, host.gateway) for name, url in self.service_urls.items() if url
        }

    def env(self, host: Host) -> dict[str, str]:
        """The service URLs (by their environment names) as the host's processes see them."""
        return {name: url for name, (url, _) in self._urls_for(host).items()}


def start_in_host(
    host: Host, argv: list[str], log_path: Path, env: dict[str, str]
) -> subprocess.Popen:
    """A process inside the host, in a session of its own, its output in `log_path`."""
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            host.argv(argv),
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(
    process: subprocess.Popen, log_path: Path, ready: bytes, timeout: float = 30.0
) -> None:
    """Until `ready` shows in the log; the process is stopped and an error raised if it exits
    or the timeout passes first."""
    deadline = time.monotonic() + timeout
    while ready not in log_path.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{log_path.name}: not ready within {timeout:.0f}s:\n{tail}")
        time.sleep(0.1)


def celery_worker_argv(app: str, queues: str, concurrency: int, node: str) -> list[str]:
    return [
        str(Path(sys.executable).parent / "celery"),
        "-A",
        app,
        "worker",
        "-P",
        "prefork",
        "-c",
        str(concurrency),
        "-Q",
        queues,
        "--without-gossip",
        "--without-mingle",
        "-l",
        "INFO",
        "-n",
        node,
    ]


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM (a warm shutdown), then SIGKILL the whole process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
