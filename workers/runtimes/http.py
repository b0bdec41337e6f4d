"""The `http` runtime: POST the execution to a URL; a 2xx JSON object body is the output.

The worker POSTs `{"input", "execution_id", "attempt", "agent"}` as JSON. How answers map:

- 2xx with a JSON body: that body is the output (the runner checks it is an object matching the
  output_schema: a JSON array or string is `output_invalid`, like a python agent returning one).
- 2xx with a body that is not JSON (or not UTF-8): `runtime_error`, final.
- 301/302/303 (followed as GET, no body) and 307/308 (followed as POST, same body), at most
  MAX_REDIRECTS hops, each hop checked by the address guard; https never downgrades to http, and
  the agent's headers are dropped when a hop changes origin (any may carry a credential).
- 5xx, 429, and failures to resolve, connect or read: `runtime_error`, retryable.
- any other status: `runtime_error`, final.
- no full answer within the runtime's timeout_seconds (at most the agent's): `timeout`.
- a body over the agent's limits.max_output_bytes (else RUNYARD_MAX_OUTPUT_BYTES):
  `output_too_large`.
- a host the address guard refuses: `runtime_error`, final, and the request is never sent.

Progress: the final answer may carry `Runyard-Progress: <0..1>` (and `Runyard-Progress-Message`),
recorded as the execution's progress like ctx.progress; a malformed one is logged at warning.
The execution's W3C trace context goes out as the `traceparent` header, when it has one; its own
API token (while it runs) and the API's URL as `Runyard-Execution-Token` and `Runyard-Api-Url`.

The standard library's http.client does the HTTP: it lets the connection go to the address the
guard checked while the Host header and TLS (SNI and certificate check) use the URL's host name.
"""

from __future__ import annotations

import http.client
import json
import resource
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from app.address_guard import (
    AddressRefused,
    IPAddress,
    ResolutionFailed,
    Resolver,
    checked_addresses,
    system_resolver,
)
from app.config import current_config
from app.executions.spec import LEVELS, VersionSpec
from workers.context import Context, LogLines, checked_progress
from workers.runtimes import Outcome

DEFAULT_TIMEOUT_SECONDS = 30
MAX_REDIRECTS = 5
READ_CHUNK_BYTES = 64 * 1024
# How often a wait for the remote's answer looks at ctx.cancelled() (which itself asks the
# database at most every Context.CANCEL_CHECK_SECONDS).
CANCEL_POLL_SECONDS = 0.5
USER_AGENT = "runyard-http-runtime/1"
PROGRESS_HEADER = "Runyard-Progress"
PROGRESS_MESSAGE_HEADER = "Runyard-Progress-Message"


@dataclass
class Answer:
    status: int
    reason: str
    body: bytes
    url: str
    # Runyard-Progress and Runyard-Progress-Message of the final answer, if it sent them.
    progress: tuple[str | None, str | None] = (None, None)


class CallFailed(Exception):
    """The call did not produce an answer: error type, message, and whether a retry may help."""

    def __init__(
        self, error_type: str, message: str, *, retryable: bool, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.retryable = retryable
        self.hint = hint


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address checked beforehand; Host comes from the URL's host name."""

    def __init__(self, host: str, port: int, address: IPAddress, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((str(self._address), self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As above, with TLS whose SNI and certificate check use the URL's host name."""

    def __init__(
        self, host: str, port: int, address: IPAddress, timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls_context = context

    def connect(self) -> None:
        sock = socket.create_connection((str(self._address), self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._tls_context.wrap_socket(sock, server_hostname=self.host)


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self._at - time.monotonic()
        if left <= 0:
            raise CallFailed(
                "timeout",
                f"the remote did not answer in full within {self.seconds:g} s "
                f"(the runtime's timeout_seconds, at most the agent's)",
                retryable=True,
            )
        return left


def post_json(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout_seconds: float,
    max_bytes: int,
    allow_hosts: Iterable[str],
    resolver: Resolver = system_resolver,
    cancelled: Callable[[], bool] = lambda: False,
    tls_context: ssl.SSLContext | None = None,
) -> Answer:
    """POST `body` to `url`, following redirects, every hop's addresses checked first."""
    deadline = _Deadline(timeout_seconds)
    allow_hosts = tuple(allow_hosts)
    tls_context = tls_context or ssl.create_default_context()
    method, payload, sent_headers = "POST", body, dict(headers)
    for _hop in range(MAX_REDIRECTS + 1):
        answer, location = _exchange(
            method,
            url,
            payload,
            sent_headers,
            deadline=deadline,
            max_bytes=max_bytes,
            allow_hosts=allow_hosts,
            resolver=resolver,
            cancelled=cancelled,
            tls_context=tls_context,
        )
        if location is None:
            return answer
        next_url = urljoin(url, location)
        _check_redirect(url, next_url)
        if answer.status in (301, 302, 303):
            method, payload = "GET", b""
            sent_headers = {k: v for k, v in sent_headers.items() if k.lower() != "content-type"}
        if _origin(next_url) != _origin(url):
            # Any header the agent set may carry a credential (X-Api-Key, ...): none crosses.
            sent_headers = {k: v for k, v in sent_headers.items() if k.lower() == "content-type"}
        url = next_url
    raise CallFailed(
        "runtime_error", f"more than {MAX_REDIRECTS} redirects, last to {url}", retryable=False
    )


def post_once(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    connect_seconds: float,
    timeout_seconds: float,
    max_bytes: int,
    allow_hosts: Iterable[str],
    tls_context: ssl.SSLContext,
    resolver: Resolver = system_resolver,
) -> Answer:
    """POST `body` to `url` once, its addresses checked first; a redirect is not followed (the
    3xx is the answer). For notifications (workers/notify.py), which keep one `tls_context`
    (building one reads the CA store: milliseconds a request)."""
    answer, _location = _exchange(
        "POST",
        url,
        body,
        headers,
        deadline=_Deadline(timeout_seconds),
        max_bytes=max_bytes,
        allow_hosts=tuple(allow_hosts),
        resolver=resolver,
        cancelled=lambda: False,
        tls_context=tls_context,
        connect_seconds=connect_seconds,
    )
    return answer


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or ""), parts.port or default


def _check_redirect(current: str, target: str) -> None:
    scheme = urlsplit(target).scheme
    if scheme not in ("http", "https"):
        raise CallFailed(
            "runtime_error", f"redirected to a non-HTTP URL ({scheme}:)", retryable=False
        )
    if urlsplit(current).scheme == "https" and scheme == "http":
        raise CallFailed(
            "runtime_error",
            f"redirected from https to plain http ({target}): refused",
            retryable=False,
        )


def _exchange(
    method: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    deadline: _Deadline,
    max_bytes: int,
    allow_hosts: tuple[str, ...],
    resolver: Resolver,
    cancelled: Callable[[], bool],
    tls_context: ssl.SSLContext,
    connect_seconds: float | None = None,
) -> tuple[Answer, str | None]:
    """One request to one URL: the answer, and the Location to follow if it is a redirect."""
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise CallFailed("runtime_error", f"bad URL {url!r}: {exc}", retryable=False) from exc
    if not host:
        raise CallFailed("runtime_error", f"bad URL {url!r}: no host", retryable=False)
    try:
        addresses = checked_addresses(host, port, allow_hosts=allow_hosts, resolver=resolver)
    except AddressRefused as exc:
        raise CallFailed("runtime_error", exc.message, retryable=False, hint=exc.hint) from exc
    except ResolutionFailed as exc:
        raise CallFailed("runtime_error", str(exc), retryable=True) from exc
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = _connect(
        parts.scheme, host, port, addresses, deadline, tls_context, connect_seconds
    )
    try:
        try:
            connection.request(method, path, body=body or None, headers=headers)
            # getresponse() hands the socket over to the response and may drop its own reference.
            sock = connection.sock
            _wait_for_answer(sock, deadline, cancelled)
            sock.settimeout(deadline.remaining())
            response = connection.getresponse()
            status, reason = response.status, response.reason
            location = response.getheader("Location")
            if status in (301, 302, 303, 307, 308) and location:
                return Answer(status, reason, b"", url), location
            data = _read_body(response, sock, deadline, max_bytes, cancelled)
            progress = (
                response.getheader(PROGRESS_HEADER),
                response.getheader(PROGRESS_MESSAGE_HEADER),
            )
        except TimeoutError as exc:
            deadline.remaining()  # raises the timeout once the deadline has passed
            raise CallFailed("timeout", f"{url}: {exc}", retryable=True) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise CallFailed(
                "runtime_error",
                f"{method} {url} failed: {type(exc).__name__}: {exc}",
                retryable=True,
            ) from exc
    finally:
        connection.close()
    return Answer(status, reason, data, url, progress), None


def _connect(
    scheme: str,
    host: str,
    port: int,
    addresses: list[IPAddress],
    deadline: _Deadline,
    tls_context: ssl.SSLContext,
    connect_seconds: float | None = None,
) -> http.client.HTTPConnection:
    failures: list[str] = []
    for address in addresses:
        timeout = min(deadline.remaining(), connect_seconds or float("inf"))
        if scheme == "https":
            connection: http.client.HTTPConnection = _PinnedHTTPSConnection(
                host, port, address, timeout, tls_context
            )
        else:
            connection = _PinnedHTTPConnection(host, port, address, timeout)
        try:
            connection.connect()
            return connection
        except ssl.SSLCertVerificationError as exc:
            connection.close()
            raise CallFailed(
                "runtime_error", f"TLS certificate of {host} refused: {exc}", retryable=False
            ) from exc
        except OSError as exc:
            connection.close()
            failures.append(f"{address}: {type(exc).__name__}: {exc}")
    deadline.remaining()
    raise CallFailed(
        "runtime_error",
        f"cannot connect to {host}:{port} ({'; '.join(failures)})",
        retryable=True,
    )


def _wait_for_answer(
    sock: socket.socket, deadline: _Deadline, cancelled: Callable[[], bool]
) -> None:
    """Wait until the remote starts answering, looking at the deadline and cancellation."""
    pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
    while not pending:
        readable, _, _ = select.select(
            [sock], [], [], min(deadline.remaining(), CANCEL_POLL_SECONDS)
        )
        if readable:
            return
        if cancelled():
            raise CallFailed("cancelled", "cancelled while waiting for the remote", retryable=False)


def _read_body(
    response: http.client.HTTPResponse,
    sock: socket.socket,
    deadline: _Deadline,
    max_bytes: int,
    cancelled: Callable[[], bool],
) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise CallFailed(
            "output_too_large",
            f"the response declares {declared} bytes; at most {max_bytes} are accepted",
            retryable=False,
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        sock.settimeout(deadline.remaining())
        chunk = response.read1(READ_CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise CallFailed(
                "output_too_large",
                f"the response is over {max_bytes} bytes; at most {max_bytes} are accepted",
                retryable=False,
            )
        chunks.append(chunk)
        if cancelled():
            raise CallFailed("cancelled", "cancelled while reading the answer", retryable=False)


def outcome_of(answer: Answer) -> Outcome:
    """What the remote's final answer means for the execution."""
    status = answer.status
    if 200 <= status < 300:
        try:
            return Outcome(output=json.loads(answer.body.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as exc:
            return Outcome(
                error_type="runtime_error",
                error_message=f"{answer.url} answered {status} with a body that is not JSON "
                f"({exc}): {_excerpt(answer.body)}",
                retryable=False,
            )
    retryable = status == 429 or status >= 500
    return Outcome(
        error_type="runtime_error",
        error_message=f"{answer.url} answered {status} {answer.reason}"
        + ("" if retryable else " (final: not retried)")
        + (f": {_excerpt(answer.body)}" if answer.body else ""),
        retryable=retryable,
    )


def _report_progress(answer: Answer, ctx: Context, logs: LogLines) -> None:
    fraction, message = answer.progress
    if fraction is None:
        return
    try:
        ctx.progress(*checked_progress(float(fraction), message or None))
    except (TypeError, ValueError) as exc:
        logs.add(LEVELS["warning"], f"{PROGRESS_HEADER} header refused ({exc}): {fraction!r}")


def _excerpt(body: bytes, limit: int = 300) -> str:
    text = body[:limit].decode("utf-8", errors="replace")
    return text + ("..." if len(body) > limit else "")


def run(spec: VersionSpec, payload: dict[str, Any], ctx: Context, logs: LogLines) -> Outcome:
    cfg = current_config()
    runtime = spec.runtime
    timeout = min(runtime.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS), spec.timeout_seconds)
    max_bytes = spec.limits.get("max_output_bytes") or cfg.max_output_bytes
    body = json.dumps(
        {
            "input": payload,
            "execution_id": ctx.execution_id,
            "attempt": ctx.attempt,
            "agent": ctx.agent,
        }
    ).encode()
    headers = {
        "User-Agent": USER_AGENT,
        "Accept": "application/json",
        **runtime.get("headers", {}),
        "Content-Type": "application/json",
        # The run's own token for the API (children, state, events, documents), and where the
        # API is: headers, so that the body stays what API.md says the worker POSTs.
        "Runyard-Execution-Token": ctx.execution_token(),
        "Runyard-Api-Url": cfg.agents_api_url,
    }
    if ctx.traceparent:
        # The execution's trace context, over any the agent's headers set (in any case).
        headers = {k: v for k, v in headers.items() if k.lower() != "traceparent"}
        headers["traceparent"] = ctx.traceparent
    cpu_before = time.thread_time()
    started = time.perf_counter()
    try:
        answer = post_json(
            runtime["url"],
            body,
            headers,
            timeout_seconds=timeout,
            max_bytes=max_bytes,
            allow_hosts=cfg.http_allow_hosts,
            cancelled=ctx.cancelled,
        )
    except CallFailed as exc:
        logs.add(LEVELS["warning"], exc.message)
        outcome = Outcome(
            error_type="runtime_error" if exc.error_type == "cancelled" else exc.error_type,
            error_message=exc.message,
            cancelled=exc.error_type == "cancelled",
            retryable=exc.retryable,
            hint=exc.hint,
        )
    else:
        logs.add(
            LEVELS["info"],
            f"{answer.url} answered {answer.status} {answer.reason}",
            {"status": answer.status, "bytes": len(answer.body)},
        )
        _report_progress(answer, ctx, logs)
        outcome = outcome_of(answer)
    outcome.usage = {
        # The worker thread's CPU for this call (TLS, JSON); the remote's own work is not ours.
        "cpu_seconds": round(time.thread_time() - cpu_before, 4),
        # The pool process's peak: the call runs inside it.
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "wall_ms": round((time.perf_counter() - started) * 1000),
    }
    if not outcome.ok and ctx.cancelled():
        outcome.cancelled = True
    return outcome
