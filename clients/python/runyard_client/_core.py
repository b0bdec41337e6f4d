"""What the sync and async clients share: retries, error answers, pages, and the SSE parser."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from runyard_client.errors import RunyardError, error_for
from runyard_client.types import Event

USER_AGENT = "runyard-client/0.1"


@dataclass(frozen=True)
class RetryPolicy:
    """How submits ride out a restart or an overload: connection errors, 503 and 429 are retried
    with the same Idempotency-Key (so a retry never runs anything twice), waiting the server's
    Retry-After when it gives one, else an exponential backoff."""

    attempts: int = 5
    backoff_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    # A Retry-After longer than this (a daily CPU quota answers "until midnight") is not waited
    # out: the RateLimited error goes to the caller at once.
    max_wait_seconds: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before the next try, or None when it is time to give up."""
        if attempt + 1 >= self.attempts:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_wait_seconds else None
        return min(self.backoff_seconds * 2**attempt, self.backoff_max_seconds)


RETRY_STATUSES = frozenset({429, 503})


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def http_options(url: str, token: str, timeout: float, transport: Any) -> dict[str, Any]:
    """The keyword arguments of the sync and the async httpx client alike."""
    return {
        "base_url": f"{url}/api/v1",
        "headers": {"Authorization": f"Bearer {token}", "User-Agent": USER_AGENT},
        "timeout": timeout,
        "transport": transport,
    }


def retry_wait(
    policy: RetryPolicy,
    attempt: int,
    *,
    method: str,
    creates: bool,
    response: httpx.Response | None,
) -> float | None:
    """Seconds to wait before sending a request again, or None to stop: after a connection
    error (`response` None) a read or a create is retried; after an answer, only a create
    refused with 429 or 503 (its Idempotency-Key keeps the retry from running it twice)."""
    if response is None:
        return policy.delay(attempt, None) if creates or method == "GET" else None
    if not creates or response.status_code not in RETRY_STATUSES:
        return None
    return policy.delay(attempt, retry_after(response))


def idempotency_headers() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    raise error_for(response.status_code, body, retry_after(response))


def decode(response: httpx.Response) -> Any:
    raise_for(response)
    if response.status_code == 204 or not response.content:
        return None
    return response.json()


def next_page(response: httpx.Response) -> int | None:
    """The next page number from X-Pagination (flask-smorest's header), None on the last."""
    raw = response.headers.get("X-Pagination")
    if not raw:
        return None
    try:
        return json.loads(raw).get("next_page")
    except ValueError:
        return None


def connection_error(exc: httpx.TransportError, url: str) -> RunyardError:
    from runyard_client.errors import ConnectionFailed

    return ConnectionFailed(
        f"cannot reach {url}: {exc}",
        hint="is the server up? `runyard login --url URL --token TOKEN`, or RUNYARD_URL",
    )


class SSEParser:
    """Server-Sent Events, line by line (the WHATWG rules the stream uses): `event:`, `data:`
    (joined by newlines, parsed as JSON), `id:`; a blank line ends an event; comment lines (the
    keepalives) are skipped."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.event = "message"
        self.data: list[str] = []
        self.id: str | None = None

    def feed(self, line: str) -> Event | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self.data:
                self._reset()
                return None
            text = "\n".join(self.data)
            try:
                data = json.loads(text)
            except ValueError:
                data = text
            event = Event(event=self.event, data=data, id=self.id)
            self._reset()
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self.event = value
        elif field == "data":
            self.data.append(value)
        elif field == "id":
            self.id = value
        return None
