"""`runyard up`: every process for one machine, on embedded servers unless told otherwise."""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from app.config import Config, current_config, use_config
from app.db import db
from app.embedded import EmbeddedPostgres, EmbeddedRedis

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path
    # Where this run's lines start in the (appended) log.
    log_offset: int = 0


class Supervisor:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.children: list[Child] = []
        (home / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start a child; `env` adds to the supervisor's environment (secrets go there, never
        in argv: any local user reads a process's command line in `ps`)."""
        log_path = self.home / "logs" / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - held open for the child's lifetime
        offset = log_file.tell()
        # Own session: Ctrl-C reaches only this supervisor, which stops the children in order.
        process = subprocess.Popen(
            argv,
            env={**self.env, **(env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        self.children.append(Child(name, process, log_path, offset))

    def dead(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop(self, timeout: float = 15.0) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_http(url: str, supervisor: Supervisor, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        dead = supervisor.dead()
        if dead:
            raise RuntimeError(f"{dead.name} exited early:\n{_tail(dead.log_path)}")
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def _wait_log(supervisor: Supervisor, name: str, marker: str, timeout: float = 60.0) -> None:
    """Wait until a child writes `marker` to its log (Celery's worker says "ready.")."""
    child = next(c for c in supervisor.children if c.name == name)
    # From where the child started: on a loaded machine it may be ready before the API is.
    start = child.log_offset
    deadline = time.monotonic() + timeout
    while marker not in child.log_path.read_text(errors="replace")[start:]:
        if child.process.poll() is not None:
            raise RuntimeError(f"{name} exited early:\n{_tail(child.log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} was not ready within {timeout:.0f}s; see {child.log_path}")
        time.sleep(0.2)


def _secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(18)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


SECRET_KEYS_FILE = "secret-keys"


def secret_keys(home: Path) -> str:
    """RUNYARD_SECRET_KEYS, else the key kept in `home` (made on the first start, readable by
    its owner only): secrets, webhook and notification secrets are sealed under it."""
    configured = os.environ.get("RUNYARD_SECRET_KEYS", "").strip()
    if configured:
        return configured
    path = home / SECRET_KEYS_FILE
    if not path.exists():
        from app.secrets.crypto import new_key

        # Created 0600 from the start: no moment when another user could read it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_key() + "\n")
    return path.read_text().strip()


def _dev_token(home: Path) -> str:
    """The `default` organization's admin token: reused while it still works."""
    from app.errors import Unauthorized
    from app.orgs import services

    token_file = home / "dev-token"
    if token_file.exists():
        token = token_file.read_text().strip()
        with contextlib.suppress(Unauthorized):
            services.authenticate(f"Bearer {token}")
            return token
    with db.session() as session:
        org = services.get_org_by_name(session, "default")
        if org is None:
            _, token = services.create_org(session, "default")
        else:
            token = services.create_token(session, org.id, name="dev", role="admin")
        session.commit()
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    return token


def load_examples(org_name: str = "default") -> list[str]:
    from sqlalchemy import select

    from app.agents import services
    from app.orgs.models import ApiToken
    from app.orgs.services import Principal, get_org_by_name
    from runyard_examples import AGENTS

    with db.session() as session:
        org = get_org_by_name(session, org_name)
        token = session.scalar(select(ApiToken).where(ApiToken.org_id == org.id).limit(1))
        principal = Principal(org.id, org.name, token.id, "examples", "admin")
        names = [services.ensure(session, principal, definition).name for definition in AGENTS]
        session.commit()
    return names


def write_env(home: Path, values: dict[str, str]) -> Path:
    """.runyard/env: what `celery -A workers inspect ...`, `runyard ...` and scripts need to reach
    these servers (`set -a; . .runyard/env; set +a`). 0600: it holds the dev token."""
    path = home / "env"
    text = "".join(f"{name}={shlex.quote(value)}\n" for name, value in values.items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)
    return path


def flower_command(port: int, user: str, password: str) -> tuple[list[str], dict[str, str]]:
    """Flower on loopback, behind HTTP basic auth: its pages and API show task arguments and
    can shut workers down, so it never runs open. The argv, and the environment to add: the
    credentials travel in FLOWER_BASIC_AUTH (which Flower reads), not on the command line,
    where every local user could read them (`ps`, /proc/<pid>/cmdline); a process's
    environment is readable by its own user only."""
    if not password:
        raise ValueError("Flower needs a password (RUNYARD_FLOWER_PASSWORD)")
    if "," in user or "," in password:
        # Flower splits FLOWER_BASIC_AUTH at commas (a list of user:password pairs).
        raise ValueError("RUNYARD_FLOWER_USER and RUNYARD_FLOWER_PASSWORD cannot hold a comma")
    celery = Path(sys.executable).parent / "celery"
    argv = [str(celery), "-A", "workers", "flower", f"--port={port}", "--address=127.0.0.1"]
    return argv, {"FLOWER_BASIC_AUTH": f"{user}:{password}"}


class _StopRequest:
    """The handler of SIGINT and SIGTERM: it only notes the request; `up` acts on it between its
    looks at the children, outside the signal handler."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, _signum, _frame) -> None:
        self.requested = True


@dataclass
class _Running:
    """What `up` has started so far, so that whatever fails, all of it is stopped."""

    postgres: EmbeddedPostgres | None = None
    redis_server: EmbeddedRedis | None = None
    supervisor: Supervisor | None = None

    def stop(self) -> None:
        if self.supervisor:
            self.supervisor.stop()
        db.dispose()
        if self.redis_server:
            self.redis_server.stop()
        if self.postgres:
            self.postgres.stop()


def _start_servers(cfg: Config, home: Path, running: _Running) -> tuple[str, str]:
    """The database and Redis URLs: the configured ones, else those of embedded servers."""
    database_url = cfg.database_url
    if not database_url:
        print("starting embedded PostgreSQL ...", flush=True)
        running.postgres = EmbeddedPostgres(home / "pgdata")
        database_url = running.postgres.start()
    redis_url = os.environ.get("REDIS_URL", "")
    if not redis_url:
        print("starting embedded Redis ...", flush=True)
        running.redis_server = EmbeddedRedis(home / "redis")
        redis_url = running.redis_server.start()
    return database_url, redis_url


def _use_servers(database_url: str, redis_url: str) -> Config:
    """Point this process at the servers and bring the database schema up to date."""
    os.environ.update({"DATABASE_URL": database_url, "REDIS_URL": redis_url})
    cfg = Config.from_env()
    use_config(cfg)
    db.configure(cfg.database_url)

    from app.migrate import upgrade

    upgrade(cfg.database_url)
    return cfg


def _start_processes(supervisor: Supervisor, cfg: Config, home: Path, flower_password: str) -> None:
    bin_dir = Path(sys.executable).parent
    celery = [str(bin_dir / "celery"), "-A", "workers"]
    concurrency = cfg.worker_concurrency or os.cpu_count() or 2
    supervisor.start("api", [str(bin_dir / "runyard"), "api"])
    supervisor.start(
        "worker",
        [
            *celery,
            "worker",
            "-l",
            "INFO",
            "-c",
            str(concurrency),
            "-n",
            "runyard@%h",
            "-Q",
            "default",
        ],
    )
    supervisor.start(
        "beat", [*celery, "beat", "-l", "INFO", "-s", str(home / "celerybeat-schedule")]
    )
    argv, env = flower_command(cfg.flower_port, cfg.flower_user, flower_password)
    supervisor.start("flower", argv, env)


def _print_welcome(
    cfg: Config, home: Path, api_url: str, token: str, flower_password: str, examples: list[str]
) -> None:
    print(
        f"""
Runyard is up.
  API          {api_url}/api/v1
  API docs     {api_url}/api/v1/docs
  console      {api_url}/ui/   (sign in with the dev token)
  Flower       http://127.0.0.1:{cfg.flower_port}
               user {cfg.flower_user}, password {flower_password}
  dev token    {token}   (also in {home / "dev-token"})
  examples     {", ".join(examples) or "not loaded"}
  logs         {home / "logs"}

Try, in another shell:
  set -a; . {home / "env"}; set +a
  {Path(sys.executable).parent / "runyard"} run slugify --follow \\
      --input '{{"title": "Hello, Runyard!"}}'

Ctrl-C stops everything.""",
        flush=True,
    )


def _watch(supervisor: Supervisor, stop: _StopRequest) -> int:
    """Until a stop is requested (0) or a child exits on its own (1)."""
    while not stop.requested:
        dead = supervisor.dead()
        if dead:
            print(
                f"\n{dead.name} exited (code {dead.process.returncode}); stopping.\n"
                f"{_tail(dead.log_path)}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.5)
    print("\nstopping ...", flush=True)
    return 0


def up(with_examples: bool = True) -> int:
    cfg = current_config()
    home = cfg.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    running = _Running()
    stop = _StopRequest()
    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    try:
        database_url, redis_url = _start_servers(cfg, home, running)
        # In this process's environment before the migrations run (they seal clear webhook
        # secrets), and so in every child's.
        os.environ["RUNYARD_SECRET_KEYS"] = secret_keys(home)
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "RUNYARD_HOME": str(home),
        }
        cfg = _use_servers(database_url, redis_url)
        token = _dev_token(home)
        flower_password = cfg.flower_password or _secret(home / "flower-password")
        # Held by `running` before any child starts: one that fails to start must not leave
        # the ones before it running.
        running.supervisor = Supervisor(home, env)
        _start_processes(running.supervisor, cfg, home, flower_password)
        api_url = f"http://{cfg.api_host}:{cfg.api_port}"
        _wait_http(f"{api_url}/healthz", running.supervisor)
        _wait_log(running.supervisor, "worker", "ready.")
        write_env(
            home,
            {
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_url,
                "RUNYARD_HOME": str(home),
                "RUNYARD_URL": api_url,
                "RUNYARD_TOKEN": token,
            },
        )
        examples = load_examples() if with_examples else []
        _print_welcome(cfg, home, api_url, token, flower_password, examples)
        return _watch(running.supervisor, stop)
    except RuntimeError as exc:
        print(f"runyard up: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        running.stop()
        print("stopped.", flush=True)
