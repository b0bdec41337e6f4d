"""The wallet service's settings (RUNYARD_WALLET_*), read from the environment; app/config.py
holds them as `Config.wallet` and lists them in the README's configuration table."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

# Circle's USDC on the chains Engine names this way (checked against each chain's explorer);
# any other chain or token: RUNYARD_WALLET_CURRENCIES.
DEFAULT_CURRENCIES: dict[str, dict[str, str]] = {
    "ethereum": {"USDC": "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"},
    "base": {"USDC": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"},
    "polygon": {"USDC": "0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359"},
    "arbitrum": {"USDC": "0xaf88d065e77c8cC2239327C5EDb3A432268e5831"},
    "optimism": {"USDC": "0x0b2C639c533813f4Aa9D7837CAf62653d097Ff85"},
}
TOKEN_SECRET = "wallet-engine-token"


def _currencies(raw: str) -> dict[str, dict[str, str]]:
    name = "RUNYARD_WALLET_CURRENCIES"
    try:
        parsed: Any = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be JSON: {exc}") from exc
    if not isinstance(parsed, dict) or not all(
        isinstance(tokens, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in tokens.items())
        for tokens in parsed.values()
    ):
        raise ValueError(f'{name} must be {{"<chain>": {{"<currency>": "<token address>"}}}}')
    return parsed


@dataclass(frozen=True)
class WalletSettings:
    # Empty: no wallet service (creating a wallet, sending a transfer: 502 with a hint).
    engine_url: str = ""
    # The organization secret (PUT /api/v1/secrets/{name}) holding the service's access token.
    token_secret: str = TOKEN_SECRET
    timeout_seconds: float = 10.0
    # chain -> currency symbol -> token address; a policy's `currency` is looked up here.
    currencies: dict[str, dict[str, str]] = field(
        default_factory=lambda: DEFAULT_CURRENCIES, hash=False
    )

    @classmethod
    def from_env(cls) -> WalletSettings:
        raw_timeout = os.environ.get("RUNYARD_WALLET_ENGINE_TIMEOUT_SECONDS", "")
        try:
            timeout = float(raw_timeout) if raw_timeout else cls.timeout_seconds
        except ValueError as exc:
            raise ValueError(
                f"RUNYARD_WALLET_ENGINE_TIMEOUT_SECONDS must be a number, got {raw_timeout!r}"
            ) from exc
        if not timeout > 0:
            raise ValueError("RUNYARD_WALLET_ENGINE_TIMEOUT_SECONDS must be above 0")
        raw_currencies = os.environ.get("RUNYARD_WALLET_CURRENCIES", "").strip()
        return cls(
            engine_url=os.environ.get("RUNYARD_WALLET_ENGINE_URL", "").strip().rstrip("/"),
            token_secret=os.environ.get("RUNYARD_WALLET_ENGINE_TOKEN_SECRET") or TOKEN_SECRET,
            timeout_seconds=timeout,
            currencies=_currencies(raw_currencies) if raw_currencies else DEFAULT_CURRENCIES,
        )

    def currency_address(self, chain: str, currency: str) -> str | None:
        return self.currencies.get(chain, {}).get(currency)


DOCUMENTED: tuple[tuple[str, str, str], ...] = (
    (
        "RUNYARD_WALLET_ENGINE_URL",
        "empty: no wallet service",
        "base URL of the wallet service (Thirdweb Engine v2's HTTP API) that makes agents' "
        "wallets and sends their transfers; its host passes the http runtime's address guard "
        "(RUNYARD_HTTP_ALLOW_HOSTS for a private one)",
    ),
    (
        "RUNYARD_WALLET_ENGINE_TOKEN_SECRET",
        TOKEN_SECRET,
        "name of the organization's secret (PUT /api/v1/secrets/{name}) holding the wallet "
        "service's access token, sent as `Authorization: Bearer`",
    ),
    (
        "RUNYARD_WALLET_ENGINE_TIMEOUT_SECONDS",
        "10",
        "longest a call to the wallet service may take",
    ),
    (
        "RUNYARD_WALLET_CURRENCIES",
        "USDC on ethereum, base, polygon, arbitrum, optimism",
        'JSON `{"<chain>": {"<currency>": "<token address>"}}`: the token a wallet_policy\'s '
        "`currency` means on each chain (replaces the default; a chain or currency missing "
        "from it refuses the transfer)",
    ),
)
