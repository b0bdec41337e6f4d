"""Every setting Runyard reads, from the environment, in one place.

The README's configuration table is generated from the same names; keep the two in step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from app.wallet_settings import DOCUMENTED as WALLET_SETTINGS
from app.wallet_settings import WalletSettings


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


def _positive_float(name: str, default: float) -> float:
    value = _float(name, default)
    if value <= 0:
        raise ValueError(f"{name} must be above 0, got {value}")
    return value


def _optional_limit(name: str, kind: type[int] | type[float]) -> int | float | None:
    """A default organization limit: unset or `none` for no limit, else a number above 0."""
    raw = os.environ.get(name, "").strip()
    if raw in ("", "none"):
        return None
    try:
        value = kind(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number above 0 or `none`, got {raw!r}") from exc
    # NaN passes `<= 0` and infinity is no limit; whole numbers must fit PostgreSQL's integer.
    if not math.isfinite(value) or value <= 0 or (kind is int and value > 2**31 - 1):
        raise ValueError(f"{name} must be above 0 or `none`, got {raw!r}")
    return value


def _weight(name: str, default: int) -> int:
    """An organization's weight: a whole number 1..1000 (the organizations' check constraint)."""
    value = _int(name, default)
    if not 1 <= value <= 1000:
        raise ValueError(f"{name} must be a whole number from 1 to 1000, got {value}")
    return value


def _list(name: str, default: str) -> tuple[str, ...]:
    raw = os.environ.get(name, default)
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def sqlalchemy_url(url: str) -> str:
    """Use psycopg 3 whatever scheme the operator wrote (postgres://, postgresql://)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@dataclass(frozen=True)
class Config:
    database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str = ""
    result_backend: str = ""
    home: Path = Path(".runyard")
    max_body_bytes: int = 1024 * 1024
    agent_modules: tuple[str, ...] = ("runyard_examples",)
    token_cache_seconds: float = 5.0
    schema_max_bytes: int = 64 * 1024
    schema_max_depth: int = 32
    max_timeout_seconds: int = 86400
    lease_seconds: float = 30.0
    dispatch_grace_seconds: int = 30
    sweep_interval_seconds: float = 15.0
    chain_stall_seconds: float = 60.0
    schedule_poll_seconds: float = 0.5
    log_batch_lines: int = 1000
    log_flush_seconds: float = 0.5
    log_line_max_chars: int = 8192
    allowed_commands: tuple[str, ...] = ()
    max_output_bytes: int = 4 * 1024 * 1024
    max_log_lines: int = 10000
    # Finished executions (and their logs) older than this many days are deleted by beat; 0
    # keeps them forever. An organization's retention_days overrides it.
    retention_days: int = 30
    retention_batch: int = 1000
    retention_interval_seconds: float = 300.0
    # Events sent to POST /api/v1/events older than this many days are deleted by beat (0: kept).
    event_retention_days: int = 7
    # GET /logs with q (a scan, not an index): the widest since..until it reads.
    log_search_max_days: int = 7
    child_max_file_mb: int = 64
    child_max_processes: int = 64
    kill_grace_seconds: float = 2.0
    python_cancel_grace_seconds: float = 5.0
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Where agents reach the API with their execution token (command and http runtimes): the
    # API's URL as the worker hosts see it. Unset: http://RUNYARD_API_HOST:RUNYARD_API_PORT.
    api_url: str = ""
    api_workers: int = 2
    api_threads: int = 4
    # Live event streams (app/executions/events.py): open streams a `runyard api` process
    # serves at once, on threads of their own beside api_threads.
    max_streams_per_process: int = 128
    stream_keepalive_seconds: float = 15.0
    flower_port: int = 5555
    flower_user: str = "runyard"
    flower_password: str = ""
    worker_concurrency: int = 0
    http_allow_hosts: tuple[str, ...] = ()
    # Limits a new organization starts with (app/flow); None: no limit.
    default_max_running: int | None = None
    default_max_queued: int | None = None
    default_submit_rate: float | None = None
    default_submit_burst: int | None = None
    default_cpu_seconds_per_day: float | None = None
    default_weight: int = 1
    limits_cache_seconds: float = 5.0
    # Fairness (app/executions/gates.py): messages per organization and queue held in the broker
    # not yet claimed, times the organization's weight; the rest wait in PostgreSQL. 0: off
    # (first in, first out across organizations).
    fair_window: int = 32
    # Notifications (app/notifications, workers/notify.py).
    notify_queue: str = "default"
    notify_first_retry_seconds: float = 10.0
    notify_retry_window_seconds: float = 86400.0
    notify_concurrency: int = 8
    notify_poll_seconds: float = 1.0
    # /metrics (app/stats/collector.py): agents per organization reported by name, the rest
    # as agent="other".
    metrics_max_agents: int = 50
    # The console (app/console): how long a sign-in lasts, and where its Workers page links to
    # Flower (empty: http://127.0.0.1:RUNYARD_FLOWER_PORT, as `runyard up` prints it).
    ui_session_hours: float = 12.0
    flower_url: str = ""
    # Secrets at rest (app/secrets/crypto.py): base64 32-byte keys; the first encrypts, all
    # decrypt.
    secret_keys: tuple[str, ...] = ()
    # Documents (app/documents): the largest upload, and where their bytes live: in PostgreSQL
    # (None, the default) or as files named by id in this directory, shared by the API and
    # every worker.
    max_document_mb: int = 20
    documents_path: Path | None = None
    # Agents' wallets and transfers (app/wallets): RUNYARD_WALLET_*.
    wallet: WalletSettings = field(default_factory=WalletSettings)

    @classmethod
    def from_env(cls) -> Config:
        redis_url = os.environ.get("REDIS_URL") or cls.redis_url
        return cls(
            database_url=sqlalchemy_url(os.environ.get("DATABASE_URL", "")),
            redis_url=redis_url,
            broker_url=os.environ.get("RUNYARD_BROKER_URL") or redis_url,
            result_backend=os.environ.get("RUNYARD_RESULT_BACKEND") or redis_url,
            home=Path(os.environ.get("RUNYARD_HOME", ".runyard")),
            max_body_bytes=_int("RUNYARD_MAX_BODY_BYTES", cls.max_body_bytes),
            agent_modules=_list("RUNYARD_AGENT_MODULES", "runyard_examples"),
            token_cache_seconds=_float("RUNYARD_TOKEN_CACHE_SECONDS", cls.token_cache_seconds),
            schema_max_bytes=_int("RUNYARD_SCHEMA_MAX_BYTES", cls.schema_max_bytes),
            schema_max_depth=_int("RUNYARD_SCHEMA_MAX_DEPTH", cls.schema_max_depth),
            max_timeout_seconds=_int("RUNYARD_MAX_TIMEOUT_SECONDS", cls.max_timeout_seconds),
            lease_seconds=_positive_float("RUNYARD_LEASE_SECONDS", cls.lease_seconds),
            dispatch_grace_seconds=_int(
                "RUNYARD_DISPATCH_GRACE_SECONDS", cls.dispatch_grace_seconds
            ),
            sweep_interval_seconds=_float(
                "RUNYARD_SWEEP_INTERVAL_SECONDS", cls.sweep_interval_seconds
            ),
            chain_stall_seconds=_float("RUNYARD_CHAIN_STALL_SECONDS", cls.chain_stall_seconds),
            schedule_poll_seconds=_float(
                "RUNYARD_SCHEDULE_POLL_SECONDS", cls.schedule_poll_seconds
            ),
            log_batch_lines=_int("RUNYARD_LOG_BATCH_LINES", cls.log_batch_lines),
            log_flush_seconds=_float("RUNYARD_LOG_FLUSH_SECONDS", cls.log_flush_seconds),
            log_line_max_chars=_int("RUNYARD_LOG_LINE_MAX_CHARS", cls.log_line_max_chars),
            allowed_commands=_list("RUNYARD_ALLOWED_COMMANDS", ""),
            max_output_bytes=_int("RUNYARD_MAX_OUTPUT_BYTES", cls.max_output_bytes),
            max_log_lines=_int("RUNYARD_MAX_LOG_LINES", cls.max_log_lines),
            retention_days=_int("RUNYARD_RETENTION_DAYS", cls.retention_days),
            retention_batch=_int("RUNYARD_RETENTION_BATCH", cls.retention_batch),
            retention_interval_seconds=_float(
                "RUNYARD_RETENTION_INTERVAL_SECONDS", cls.retention_interval_seconds
            ),
            log_search_max_days=_int("RUNYARD_LOG_SEARCH_MAX_DAYS", cls.log_search_max_days),
            child_max_file_mb=_int("RUNYARD_CHILD_MAX_FILE_MB", cls.child_max_file_mb),
            child_max_processes=_int("RUNYARD_CHILD_MAX_PROCESSES", cls.child_max_processes),
            kill_grace_seconds=_float("RUNYARD_KILL_GRACE_SECONDS", cls.kill_grace_seconds),
            python_cancel_grace_seconds=_float(
                "RUNYARD_PYTHON_CANCEL_GRACE_SECONDS", cls.python_cancel_grace_seconds
            ),
            api_host=os.environ.get("RUNYARD_API_HOST", cls.api_host),
            api_port=_int("RUNYARD_API_PORT", cls.api_port),
            api_workers=_int("RUNYARD_API_WORKERS", cls.api_workers),
            api_threads=_int("RUNYARD_API_THREADS", cls.api_threads),
            flower_port=_int("RUNYARD_FLOWER_PORT", cls.flower_port),
            worker_concurrency=_int("RUNYARD_WORKER_CONCURRENCY", 0),
            http_allow_hosts=_list("RUNYARD_HTTP_ALLOW_HOSTS", ""),
            default_max_running=_optional_limit("RUNYARD_DEFAULT_MAX_RUNNING", int),
            default_max_queued=_optional_limit("RUNYARD_DEFAULT_MAX_QUEUED", int),
            default_submit_rate=_optional_limit("RUNYARD_DEFAULT_SUBMIT_RATE", float),
            default_submit_burst=_optional_limit("RUNYARD_DEFAULT_SUBMIT_BURST", int),
            default_cpu_seconds_per_day=_optional_limit(
                "RUNYARD_DEFAULT_CPU_SECONDS_PER_DAY", float
            ),
            default_weight=_weight("RUNYARD_DEFAULT_WEIGHT", cls.default_weight),
            limits_cache_seconds=_float("RUNYARD_LIMITS_CACHE_SECONDS", cls.limits_cache_seconds),
            fair_window=_int("RUNYARD_FAIR_WINDOW", cls.fair_window),
            notify_queue=os.environ.get("RUNYARD_NOTIFY_QUEUE") or cls.notify_queue,
            notify_first_retry_seconds=_float(
                "RUNYARD_NOTIFY_FIRST_RETRY_SECONDS", cls.notify_first_retry_seconds
            ),
            notify_retry_window_seconds=_float(
                "RUNYARD_NOTIFY_RETRY_WINDOW_SECONDS", cls.notify_retry_window_seconds
            ),
            notify_concurrency=max(1, _int("RUNYARD_NOTIFY_CONCURRENCY", cls.notify_concurrency)),
            notify_poll_seconds=_float("RUNYARD_NOTIFY_POLL_SECONDS", cls.notify_poll_seconds),
            metrics_max_agents=_int("RUNYARD_METRICS_MAX_AGENTS", cls.metrics_max_agents),
            **_credential_settings(cls),
            **_console_settings(cls),
            **_agents_together_settings(cls),
            **_document_settings(cls),
            wallet=WalletSettings.from_env(),
        )

    @property
    def agents_api_url(self) -> str:
        """The API's URL handed to agents (RUNYARD_API_URL in a command's environment)."""
        return (self.api_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")

    @property
    def max_document_bytes(self) -> int:
        return self.max_document_mb * 1024 * 1024

    def allows_module(self, module: str) -> bool:
        """May a `python` agent's entrypoint name this module (RUNYARD_AGENT_MODULES)?"""
        return any(module == p or module.startswith(p + ".") for p in self.agent_modules)

    def require_database(self) -> str:
        if not self.database_url:
            raise RuntimeError(
                "DATABASE_URL is not set. Set it to a PostgreSQL URL "
                "(postgresql://user@host:5432/db), or use `runyard up`, "
                "which starts an embedded PostgreSQL when it is unset."
            )
        return self.database_url


def _credential_settings(cls: type[Config]) -> dict[str, object]:
    return {
        "flower_user": os.environ.get("RUNYARD_FLOWER_USER", cls.flower_user),
        "flower_password": os.environ.get("RUNYARD_FLOWER_PASSWORD", ""),
        "secret_keys": _list("RUNYARD_SECRET_KEYS", ""),
    }


def _console_settings(cls: type[Config]) -> dict[str, object]:
    """The console's, and the live event streams' it shares with the API."""
    return {
        "max_streams_per_process": _int(
            "RUNYARD_MAX_STREAMS_PER_PROCESS", cls.max_streams_per_process
        ),
        "stream_keepalive_seconds": _positive_float(
            "RUNYARD_STREAM_KEEPALIVE_SECONDS", cls.stream_keepalive_seconds
        ),
        "ui_session_hours": _positive_float("RUNYARD_UI_SESSION_HOURS", cls.ui_session_hours),
        "flower_url": os.environ.get("RUNYARD_FLOWER_URL", ""),
    }


def _agents_together_settings(cls: type[Config]) -> dict[str, object]:
    """Durable agents' surroundings: where their execution token reaches the API, how long
    events are kept."""
    return {
        "api_url": os.environ.get("RUNYARD_API_URL", cls.api_url),
        "event_retention_days": _int("RUNYARD_EVENT_RETENTION_DAYS", cls.event_retention_days),
    }


def _document_settings(cls: type[Config]) -> dict[str, object]:
    max_mb = _int("RUNYARD_MAX_DOCUMENT_MB", cls.max_document_mb)
    if max_mb < 1:
        raise ValueError(f"RUNYARD_MAX_DOCUMENT_MB must be 1 or more, got {max_mb}")
    path = os.environ.get("RUNYARD_DOCUMENTS_PATH", "").strip()
    return {"max_document_mb": max_mb, "documents_path": Path(path) if path else None}


# (environment variable, default, meaning): the README's configuration table.
DOCUMENTED_SETTINGS: tuple[tuple[str, str, str], ...] = (
    (
        "DATABASE_URL",
        "unset: embedded PostgreSQL under `.runyard/` (runyard up, tests)",
        "PostgreSQL URL, the system of record",
    ),
    (
        "REDIS_URL",
        "unset: embedded Redis under `.runyard/` (runyard up, tests)",
        "Redis URL: Celery broker and canvas result backend",
    ),
    ("RUNYARD_BROKER_URL", "REDIS_URL", "Celery broker, e.g. amqp://guest:guest@host:5672//"),
    ("RUNYARD_RESULT_BACKEND", "REDIS_URL", "Celery result backend (canvas bookkeeping only)"),
    ("RUNYARD_HOME", ".runyard", "where `runyard up` keeps embedded data, the dev token, logs"),
    ("RUNYARD_MAX_BODY_BYTES", "1048576", "largest request body; larger answers 413"),
    (
        "RUNYARD_AGENT_MODULES",
        "runyard_examples",
        "comma-separated module prefixes a `python` runtime entrypoint may name",
    ),
    (
        "RUNYARD_TOKEN_CACHE_SECONDS",
        "5",
        "how long an API process trusts a token lookup (a revoked token works at most this long)",
    ),
    ("RUNYARD_SCHEMA_MAX_BYTES", "65536", "largest input/output JSON Schema of an agent"),
    ("RUNYARD_SCHEMA_MAX_DEPTH", "32", "deepest nesting of an agent's JSON Schema"),
    (
        "RUNYARD_MAX_TIMEOUT_SECONDS",
        "86400",
        "longest agent timeout; the Redis visibility timeout is set above it",
    ),
    (
        "RUNYARD_LEASE_SECONDS",
        "30",
        "lease on a running attempt, renewed by its worker every third of it: the sweeper takes "
        "back the execution of a dead worker within this plus RUNYARD_SWEEP_INTERVAL_SECONDS",
    ),
    (
        "RUNYARD_DISPATCH_GRACE_SECONDS",
        "30",
        "age after which the sweeper republishes a committed but undispatched execution",
    ),
    ("RUNYARD_SWEEP_INTERVAL_SECONDS", "15", "how often beat runs the sweeper"),
    (
        "RUNYARD_CHAIN_STALL_SECONDS",
        "60",
        "a chain with no step under way or finished for this long is continued from PostgreSQL",
    ),
    (
        "RUNYARD_SCHEDULE_POLL_SECONDS",
        "0.5",
        "longest beat sleeps between looks at the schedules table (edits apply within it)",
    ),
    (
        "RUNYARD_LOG_BATCH_LINES",
        "1000",
        "log lines a worker buffers before writing a batch (one INSERT a batch)",
    ),
    ("RUNYARD_LOG_FLUSH_SECONDS", "0.5", "longest a log line waits in the buffer"),
    ("RUNYARD_LOG_LINE_MAX_CHARS", "8192", "longer log lines are cut, with a marker"),
    (
        "RUNYARD_ALLOWED_COMMANDS",
        "empty: no `command` agent may run",
        "comma-separated programs a `command` runtime's argv[0] may name, exactly as written",
    ),
    (
        "RUNYARD_MAX_OUTPUT_BYTES",
        "4194304",
        "largest output (as JSON) when an agent sets no `limits.max_output_bytes`",
    ),
    (
        "RUNYARD_MAX_LOG_LINES",
        "10000",
        "log lines kept per attempt when an agent sets no `limits.max_log_lines`",
    ),
    (
        "RUNYARD_RETENTION_DAYS",
        "30",
        "days finished executions, their logs and finished chain executions are kept before "
        "beat deletes them (0: forever); `runyard orgs limits NAME --retention-days D` per "
        "organization",
    ),
    ("RUNYARD_RETENTION_BATCH", "1000", "executions retention deletes a statement"),
    ("RUNYARD_RETENTION_INTERVAL_SECONDS", "300", "how often beat runs retention"),
    (
        "RUNYARD_EVENT_RETENTION_DAYS",
        "7",
        "days events sent to POST /api/v1/events are kept (0: forever); an event's id "
        "deduplicates for 24 hours either way",
    ),
    (
        "RUNYARD_LOG_SEARCH_MAX_DAYS",
        "7",
        "widest since..until of a text search (q) across executions in GET /api/v1/logs",
    ),
    (
        "RUNYARD_CHILD_MAX_FILE_MB",
        "64",
        "largest file a `script`/`command` process may write (RLIMIT_FSIZE)",
    ),
    (
        "RUNYARD_CHILD_MAX_PROCESSES",
        "64",
        "most processes a `script`/`command` execution may run at once",
    ),
    (
        "RUNYARD_KILL_GRACE_SECONDS",
        "2",
        "between SIGTERM and SIGKILL when a `script`/`command` execution times out",
    ),
    (
        "RUNYARD_PYTHON_CANCEL_GRACE_SECONDS",
        "5",
        "how long a cancelled `python` agent may run on after ctx.cancelled() turns true",
    ),
    (
        "RUNYARD_API_HOST / RUNYARD_API_PORT",
        "127.0.0.1 / 8000",
        "where `runyard up` serves the API",
    ),
    (
        "RUNYARD_API_URL",
        "http://RUNYARD_API_HOST:RUNYARD_API_PORT",
        "the API's URL as agents on the worker hosts reach it: `command` agents get it as "
        "RUNYARD_API_URL, `http` agents in the header Runyard-Api-Url, beside their execution "
        "token",
    ),
    (
        "RUNYARD_API_WORKERS / RUNYARD_API_THREADS",
        "2 / 4",
        "gunicorn processes and threads of `runyard api` for ordinary requests",
    ),
    (
        "RUNYARD_MAX_STREAMS_PER_PROCESS",
        "128",
        "open event streams per `runyard api` process, on threads of their own (beyond: 503)",
    ),
    (
        "RUNYARD_STREAM_KEEPALIVE_SECONDS",
        "15",
        "how often an idle event stream sends a `: keepalive` comment line",
    ),
    ("RUNYARD_FLOWER_PORT", "5555", "where `runyard up` serves Flower"),
    (
        "RUNYARD_FLOWER_USER / RUNYARD_FLOWER_PASSWORD",
        "runyard / random, kept in .runyard/",
        "Flower basic auth",
    ),
    (
        "RUNYARD_WORKER_CONCURRENCY",
        "number of CPUs",
        "pool processes of the worker `runyard up` starts",
    ),
    (
        "RUNYARD_HTTP_ALLOW_HOSTS",
        "empty",
        "comma-separated host names or IP literals an `http` agent may call even though they "
        "resolve to loopback, private or link-local addresses (exact match, per redirect hop)",
    ),
    (
        "RUNYARD_DEFAULT_MAX_RUNNING",
        "none",
        "`max_running` of a new organization: its executions running at once over all "
        "workers; the rest wait, queued",
    ),
    (
        "RUNYARD_DEFAULT_MAX_QUEUED",
        "none",
        "`max_queued` of a new organization: its executions not yet started, past which a "
        "submit is a 429",
    ),
    (
        "RUNYARD_DEFAULT_SUBMIT_RATE",
        "none",
        "`submit_rate` of a new organization: submits per second, one budget over every API "
        "process",
    ),
    (
        "RUNYARD_DEFAULT_SUBMIT_BURST",
        "none",
        "`submit_burst` of a new organization: submits at once above the rate (unset: the rate, "
        "at least 1)",
    ),
    (
        "RUNYARD_DEFAULT_CPU_SECONDS_PER_DAY",
        "none",
        "`cpu_seconds_per_day` of a new organization: CPU its executions may use per UTC day "
        "before submits are a 429",
    ),
    (
        "RUNYARD_DEFAULT_WEIGHT",
        "1",
        "`weight` of a new organization (1..1000): its share of a busy queue, against other "
        "organizations with executions ready",
    ),
    (
        "RUNYARD_LIMITS_CACHE_SECONDS",
        "5",
        "how long an API process trusts an organization's limits and its CPU used today (a "
        "change by `runyard orgs limits` takes effect within this)",
    ),
    (
        "RUNYARD_FAIR_WINDOW",
        "32",
        "messages an organization may have waiting in the broker per queue, times its weight; "
        "the rest wait in PostgreSQL and go out in turn as these are taken, so one "
        "organization's backlog delays another's executions by about this many (0: off, first "
        "in first out); raise it past what your workers prefetch at once",
    ),
    (
        "RUNYARD_NOTIFY_QUEUE",
        "default",
        "the queue of the tasks that deliver notifications right after the change (beat "
        "delivers what is due as well)",
    ),
    (
        "RUNYARD_NOTIFY_FIRST_RETRY_SECONDS",
        "10",
        "wait before the second attempt of a notification; it doubles (with jitter) up to an hour",
    ),
    (
        "RUNYARD_NOTIFY_RETRY_WINDOW_SECONDS",
        "86400",
        "how long after its event a notification is retried before it is marked failed",
    ),
    ("RUNYARD_NOTIFY_CONCURRENCY", "8", "deliveries one delivery run sends at once"),
    ("RUNYARD_NOTIFY_POLL_SECONDS", "1", "how often beat delivers the notifications that are due"),
    (
        "RUNYARD_METRICS_MAX_AGENTS",
        "50",
        "agents per organization that /metrics labels by name (those with the most executions); "
        'the rest are summed under agent="other"',
    ),
    (
        "RUNYARD_SECRET_KEYS",
        "unset (`runyard up`: a key made in .runyard/secret-keys)",
        "comma-separated AES-256 keys (base64 of 32 bytes) for secrets at rest: the first "
        "encrypts, all decrypt; set the same list on the API and every worker",
    ),
    (
        "RUNYARD_MAX_DOCUMENT_MB",
        "20",
        "largest document `POST /api/v1/documents` takes, in MiB (larger answers 413); the "
        "request body limit of that route only",
    ),
    (
        "RUNYARD_DOCUMENTS_PATH",
        "unset: documents' bytes in PostgreSQL",
        "a directory shared by the API and every worker (a volume or NFS mount) where "
        "documents' bytes are kept as files named by id, instead of in PostgreSQL: for large "
        "files; set the same path everywhere",
    ),
    (
        "RUNYARD_UI_SESSION_HOURS",
        "12",
        "how long a console sign-in (/ui/) lasts; revoking its token ends it at once",
    ),
    (
        "RUNYARD_FLOWER_URL",
        "http://127.0.0.1:RUNYARD_FLOWER_PORT",
        "where the console's Workers page links to Flower",
    ),
    *WALLET_SETTINGS,
)


_current: Config | None = None


def current_config() -> Config:
    """The process's settings: from the environment unless `use_config` set them."""
    global _current
    if _current is None:
        _current = Config.from_env()
    return _current


def use_config(config: Config) -> None:
    global _current
    _current = config
