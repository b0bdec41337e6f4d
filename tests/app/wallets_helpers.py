"""Helpers of the wallets' tests: a fake wallet service configured for the app, a paying
agent with a wallet, and executions put `running` as a worker's claim would."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text

from app.config import current_config, use_config
from app.db import db
from tests.fake_engine import TOKEN, FakeEngine

USDC_BASE = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
CURRENCIES = {"base": {"USDC": USDC_BASE}, "polygon": {"USDC": "0x" + "3c" * 20}}
CUSTOMER = "0x" + "ab" * 20
STRANGER = "0x" + "cd" * 20
POLICY = {
    "max_per_transaction": "100.00",
    "max_per_day": "250",
    "currency": "USDC",
    "chains": ["base", "polygon"],
    "recipients": [CUSTOMER],
    "approval_over": "50.00",
}
PAYER = {
    "name": "payer",
    "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
    "capabilities": [{"name": "payments.refund", "chains": ["base"], "authority": "execute"}],
    "wallet_policy": POLICY,
}


@contextmanager
def fake_engine() -> Iterator[FakeEngine]:
    """The fake service, and the app's settings pointing at it (127.0.0.1 is allow-listed in
    RUNYARD_HTTP_ALLOW_HOSTS for the tests)."""
    engine = FakeEngine()
    saved = current_config()
    wallet = dataclasses.replace(saved.wallet, engine_url=engine.url, currencies=CURRENCIES)
    use_config(dataclasses.replace(saved, wallet=wallet))
    try:
        yield engine
    finally:
        use_config(saved)
        engine.stop()


def ok(response, status: int) -> dict:
    assert response.status_code == status, response.get_json()
    return response.get_json()


def paying_agent(client, org, **overrides) -> dict:
    """An agent with a wallet_policy, the service's token as a secret, and a wallet."""
    ok(
        client.put(
            "/api/v1/secrets/wallet-engine-token", json={"value": TOKEN}, headers=org.headers
        ),
        200,
    )
    agent = ok(client.post("/api/v1/agents", json={**PAYER, **overrides}, headers=org.headers), 201)
    ok(client.post(f"/api/v1/agents/{agent['name']}/wallet", json={}, headers=org.headers), 201)
    return agent


def running_execution(client, org, agent: str = "payer") -> uuid.UUID:
    """An execution of `agent`, put `running` at attempt 1 as a worker's claim would."""
    body = ok(
        client.post(f"/api/v1/agents/{agent}/executions", json={"input": {}}, headers=org.headers),
        202,
    )
    with db.begin() as conn:
        conn.execute(
            text("UPDATE executions SET status = 'running', attempt = 1 WHERE id = :id"),
            {"id": body["id"]},
        )
    return uuid.UUID(body["id"])
