"""The one module that talks to the wallet service: an HTTP API compatible with Thirdweb
Engine v2's (the self-hosted and cloud Engine with `/backend-wallet/...` routes), at
RUNYARD_WALLET_ENGINE_URL.

    create_wallet(label, token=...) -> address          POST /backend-wallet/create
    transfer(chain, from_address, to, amount, currency_address, idempotency_key, token=...)
        -> queue_id                                      POST /backend-wallet/{chain}/transfer
    status(queue_id, token=...) -> {"status", "transactionHash", "errorMessage"}
                                                         GET /transaction/status/{queueId}

Every call sends `Authorization: Bearer <token>` (the organization's secret named by
RUNYARD_WALLET_ENGINE_TOKEN_SECRET: app/wallets/transfers.py opens it). A transfer also sends
`x-backend-wallet-address` and `x-idempotency-key`: Engine answers a repeated key with the
queueId of the first request instead of queueing a second transaction, which is what makes a
retried send safe.

The service's host passes the http runtime's address guard (app/address_guard.py), and the
call connects to the very address the guard checked. Whatever goes wrong (not configured,
refused, unreachable, a timeout, an error answer, a body of another shape) raises
WalletServiceFailed: a 502 with a hint at the HTTP edge.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from app.address_guard import AddressRefused, ResolutionFailed, checked_addresses
from app.config import current_config
from app.errors import RunyardError

USER_AGENT = "runyard-wallets/1"
# Engine's transaction statuses; `cancelled` is final like `errored`.
STATUSES = ("queued", "sent", "mined", "errored", "cancelled")


class WalletServiceFailed(RunyardError):
    """The wallet service could not do what was asked (or could not be asked)."""

    status_code = 502


def _hint(detail: str) -> str:
    return (
        f"{detail}; RUNYARD_WALLET_ENGINE_URL names the service and the organization's secret "
        f"{current_config().wallet.token_secret!r} (RUNYARD_WALLET_ENGINE_TOKEN_SECRET) holds "
        "its access token"
    )


def _target(path: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The URL to connect to (the checked address in place of the host), the Host header and
    the request extensions (TLS checks the host name, not the address)."""
    base = current_config().wallet.engine_url
    if not base:
        raise WalletServiceFailed(
            "no wallet service is configured",
            hint=_hint("set RUNYARD_WALLET_ENGINE_URL on the API and every worker"),
        )
    parts = urlsplit(base)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        address = checked_addresses(host, port, allow_hosts=current_config().http_allow_hosts)[0]
    except AddressRefused as refused:
        raise WalletServiceFailed(refused.message, hint=refused.hint) from None
    except ResolutionFailed as exc:
        raise WalletServiceFailed(
            f"the wallet service cannot be reached: {exc}", hint=_hint("check the host name")
        ) from None
    shown = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    url = f"{parts.scheme}://{shown}:{port}{parts.path.rstrip('/')}{path}"
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return url, {"Host": parts.netloc.rpartition("@")[2]}, extensions


def _call(method: str, path: str, token: str, *, json: Any = None, headers=None) -> Any:
    url, host, extensions = _target(path)
    sent = {
        **host,
        "Authorization": f"Bearer {token}",
        "User-Agent": USER_AGENT,
        **(headers or {}),
    }
    try:
        with httpx.Client(timeout=current_config().wallet.timeout_seconds) as client:
            answer = client.request(method, url, json=json, headers=sent, extensions=extensions)
    except httpx.HTTPError as exc:
        raise WalletServiceFailed(
            f"the wallet service cannot be reached: {type(exc).__name__}: {exc}",
            hint=_hint("check that the service is up; nothing was recorded as done"),
        ) from None
    try:
        body = answer.json()
    except ValueError:
        body = None
    if not answer.is_success:
        error = body.get("error") if isinstance(body, dict) else None
        said = error.get("message") if isinstance(error, dict) else answer.reason_phrase
        raise WalletServiceFailed(
            f"the wallet service answered {answer.status_code} to {method} {path}: {said}",
            hint=_hint("a 401 or 403 means the access token is wrong or lacks permission"),
        )
    result = body.get("result") if isinstance(body, dict) else None
    if not isinstance(result, dict):
        raise WalletServiceFailed(
            f"the wallet service's answer to {method} {path} has no `result` object",
            hint=_hint("is RUNYARD_WALLET_ENGINE_URL an Engine v2 compatible service?"),
        )
    return result


def _text(result: dict[str, Any], key: str, what: str) -> str:
    value = result.get(key)
    if not isinstance(value, str) or not value:
        raise WalletServiceFailed(
            f"the wallet service's answer has no {key} for {what}",
            hint=_hint("is RUNYARD_WALLET_ENGINE_URL an Engine v2 compatible service?"),
        )
    return value


def create_wallet(label: str | None, *, token: str) -> str:
    """A new backend wallet's address."""
    body = {} if label is None else {"label": label}
    result = _call("POST", "/backend-wallet/create", token, json=body)
    return _text(result, "walletAddress", "the new wallet")


def transfer(
    chain: str,
    from_address: str,
    to: str,
    amount: str,
    currency_address: str,
    idempotency_key: str,
    *,
    token: str,
) -> str:
    """Queue a transfer of `amount` (a decimal string, in the token's units) of the token at
    `currency_address` from the backend wallet `from_address`: its queueId."""
    result = _call(
        "POST",
        f"/backend-wallet/{quote(chain, safe='')}/transfer",
        token,
        json={"to": to, "amount": amount, "currencyAddress": currency_address},
        headers={"x-backend-wallet-address": from_address, "x-idempotency-key": idempotency_key},
    )
    return _text(result, "queueId", f"the transfer on {chain}")


def status(queue_id: str, *, token: str) -> dict[str, Any]:
    """{"status": one of STATUSES, "transactionHash", "errorMessage", "onchainStatus"}."""
    result = _call("GET", f"/transaction/status/{quote(queue_id, safe='')}", token)
    found = result.get("status")
    if found not in STATUSES:
        raise WalletServiceFailed(
            f"the wallet service gave transaction {queue_id} the unknown status {found!r}",
            hint=_hint(f"expected one of {', '.join(STATUSES)}"),
        )
    return {
        "status": found,
        "transactionHash": result.get("transactionHash"),
        "errorMessage": result.get("errorMessage"),
        "onchainStatus": result.get("onchainStatus"),
    }
