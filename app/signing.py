"""The one HMAC scheme Runyard signs with and checks: `Runyard-Signature: t=<Unix seconds>,
v1=<hex HMAC-SHA256 of "<t>.<body>">`. Notifications are signed with it (workers/notify.py)
and webhook deliveries checked against it (app/triggers/services.py)."""

from __future__ import annotations

import hashlib
import hmac


def digest(secret: str, timestamp: int | str, body: bytes) -> str:
    """The hex HMAC-SHA256 of "<timestamp>.<body>" under `secret`."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def header(secret: str, timestamp: int, body: bytes) -> str:
    """The Runyard-Signature value for `body` sent at `timestamp`."""
    return f"t={timestamp},v1={digest(secret, timestamp, body)}"
