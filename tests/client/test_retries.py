"""Submits ride out an overloaded or restarting server: a small local HTTP server that answers
503 and 429 first (outside behaviour no test of ours can make the real server show on cue)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import runyard_client
from app.embedded import free_port


class Fake:
    """Answers POSTs from a script of (status, headers) and records each request's headers."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = script
        self.seen: list[dict[str, str]] = []


@pytest.fixture
def fake() -> Iterator:
    servers = []

    def start(script):
        state = Fake(list(script))

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                state.seen.append(dict(self.headers))
                status, headers = state.script.pop(0) if state.script else (202, {})
                body = (
                    {"id": "e1", "status": "queued"}
                    if status < 400
                    else {"code": status, "message": "busy", "hint": "later", "errors": {}}
                )
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST

        server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return state, f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


FAST = runyard_client.RetryPolicy(attempts=4, backoff_seconds=0.01)


def test_a_submit_is_retried_on_503_and_429_with_one_idempotency_key(fake):
    state, url = fake([(503, {}), (429, {"Retry-After": "1"}), (202, {})])
    client = runyard_client.Runyard(url, "token", retry=FAST)
    started = time.monotonic()
    assert client.executions.submit("a", {})["id"] == "e1"
    assert time.monotonic() - started >= 1.0  # Retry-After was honoured
    keys = {seen["Idempotency-Key"] for seen in state.seen}
    assert len(state.seen) == 3 and len(keys) == 1
    client.executions.submit("a", {})
    assert state.seen[-1]["Idempotency-Key"] not in keys  # a new submit, a new key


def test_retries_give_up_with_the_errors_class_and_hint(fake):
    state, url = fake([(503, {})] * 4)
    client = runyard_client.Runyard(url, "token", retry=FAST)
    with pytest.raises(runyard_client.Unavailable) as unavailable:
        client.executions.submit("a", {})
    assert unavailable.value.status == 503 and unavailable.value.hint == "later"
    assert len(state.seen) == 4

    # A Retry-After past what is worth waiting (a daily quota) goes to the caller at once.
    state, url = fake([(429, {"Retry-After": "3600"})])
    client = runyard_client.Runyard(url, "token", retry=FAST)
    with pytest.raises(runyard_client.RateLimited) as limited:
        client.executions.submit("a", {})
    assert limited.value.retry_after == 3600 and len(state.seen) == 1

    # Reads and non-creating calls are not retried on 503.
    state, url = fake([(503, {})])
    with pytest.raises(runyard_client.ServerError):
        runyard_client.Runyard(url, "token", retry=FAST).executions.get("e1")
    assert len(state.seen) == 1


def test_connection_errors_are_retried_then_raised():
    url = f"http://127.0.0.1:{free_port()}"
    client = runyard_client.Runyard(url, "token", retry=FAST)
    with pytest.raises(runyard_client.ConnectionFailed) as failed:
        client.executions.submit("a", {})
    assert "cannot reach" in str(failed.value) and failed.value.hint


def test_async_submits_retry_the_same_way(fake):
    import asyncio

    state, url = fake([(503, {}), (202, {})])

    async def submit():
        async with runyard_client.AsyncRunyard(url, "token", retry=FAST) as client:
            return await client.executions.submit("a", {})

    assert asyncio.run(submit())["id"] == "e1"
    assert len({seen["Idempotency-Key"] for seen in state.seen}) == 1 and len(state.seen) == 2
