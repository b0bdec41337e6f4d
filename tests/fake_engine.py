"""A small fake of the wallet service (Thirdweb Engine v2's HTTP API) on 127.0.0.1, for the
wallets' tests: the three routes Runyard calls, as Engine answers them.

- POST /backend-wallet/create {"label"?} -> {"result": {"walletAddress", "status"}}
- POST /backend-wallet/{chain}/transfer (x-backend-wallet-address, x-idempotency-key)
  {"to", "amount", "currencyAddress"} -> {"result": {"queueId"}}; the same idempotency key
  answers the first request's queueId and queues nothing more
- GET /transaction/status/{queueId} -> {"result": {"queueId", "status", "transactionHash",
  "errorMessage", "onchainStatus"}}: queued, then sent, then mined on successive polls

Every request is recorded with its headers; `fail_with` makes the next answers an error
status; `stop()` makes it go away (connections refused). A wrong bearer token is a 401.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = "engine-access-token"


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Transaction:
    queue_id: str
    chain: str
    sender: str
    body: dict[str, Any]
    polls: int = 0
    tx_hash: str = field(default_factory=lambda: "0x" + secrets.token_hex(32))


class FakeEngine:
    STEPS = ("queued", "sent", "mined")

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.calls: list[Call] = []
        self.transactions: dict[str, Transaction] = {}
        self.by_key: dict[str, str] = {}
        self.failure: tuple[int, str] | None = None
        # A status the next polls answer instead of stepping (errored, cancelled).
        self.final_status: str | None = None
        # Seconds a transfer's answer is held back after the transfer was queued: a caller
        # killed meanwhile has had its transfer accepted without hearing so.
        self.transfer_answer_delay = 0.0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def fail_with(self, status: int, message: str = "engine is unhappy") -> None:
        self.failure = (status, message)

    def transfers(self) -> list[Call]:
        return [call for call in self.calls if call.path.endswith("/transfer")]

    def _answer(self, call: Call) -> tuple[int, Any]:
        if call.headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": {"message": "Unauthorized", "statusCode": 401}}
        if self.failure is not None:
            status, message = self.failure
            return status, {"error": {"message": message, "statusCode": status}}
        parts = call.path.strip("/").split("/")
        if call.method == "POST" and parts == ["backend-wallet", "create"]:
            address = "0x" + secrets.token_hex(20)
            return 200, {"result": {"walletAddress": address, "status": "success"}}
        if (
            call.method == "POST"
            and len(parts) == 3
            and parts[::2] == ["backend-wallet", "transfer"]
        ):
            return 200, {"result": {"queueId": self._queue(parts[1], call)}}
        if call.method == "GET" and parts[:2] == ["transaction", "status"] and len(parts) == 3:
            found = self.transactions.get(parts[2])
            if found is None:
                return 400, {"error": {"message": "Transaction not found.", "statusCode": 400}}
            return 200, {"result": self._status(found)}
        return 404, {"error": {"message": f"no route {call.method} {call.path}"}}

    def _queue(self, chain: str, call: Call) -> str:
        key = call.headers.get("x-idempotency-key")
        if key is not None and key in self.by_key:
            return self.by_key[key]
        queue_id = str(uuid.uuid4())
        sender = call.headers.get("x-backend-wallet-address", "")
        self.transactions[queue_id] = Transaction(queue_id, chain, sender, call.body)
        if key is not None:
            self.by_key[key] = queue_id
        return queue_id

    def _status(self, transaction: Transaction) -> dict[str, Any]:
        status = self.final_status or self.STEPS[min(transaction.polls, len(self.STEPS) - 1)]
        transaction.polls += 1
        return {
            "queueId": transaction.queue_id,
            "status": status,
            "transactionHash": transaction.tx_hash if status in ("sent", "mined") else None,
            "errorMessage": "execution reverted" if status == "errored" else None,
            "onchainStatus": "success" if status == "mined" else None,
        }

    def _handler(self):
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args):
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                call = Call(
                    self.command,
                    self.path,
                    {name.lower(): value for name, value in self.headers.items()},
                    json.loads(raw) if raw else None,
                )
                with engine._lock:
                    engine.calls.append(call)
                    status, body = engine._answer(call)
                if call.path.endswith("/transfer") and engine.transfer_answer_delay:
                    time.sleep(engine.transfer_answer_delay)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _serve
            do_POST = _serve

        return Handler
