"""The client's wallets and decisions against a real `runyard api`: a decision made by an
execution of the organization is listed, read and approved through the client."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from app.db import db
from app.wallets import transfers
from tests.app.wallets_helpers import CUSTOMER, PAYER, fake_engine
from tests.conftest import unserved_queue


def test_decisions_are_listed_read_and_answered(runyard, live_org):
    from runyard_client import Conflict, NotFound

    # The execution is put `running` by hand: on `default`, the session's worker could claim
    # and finish it first, and the decide would be fenced.
    with unserved_queue("client-wallets") as queue:
        runyard.agents.create({**PAYER, "queue": queue})
        with pytest.raises(NotFound):
            runyard.wallets.get("payer")
        execution = runyard.executions.submit("payer", {})
        with db.begin() as conn:
            conn.execute(
                text("UPDATE executions SET status = 'running', attempt = 1 WHERE id = :id"),
                {"id": execution["id"]},
            )
            # The wallet as the service would have made it (the api process has no fake service).
            conn.execute(
                text(
                    "INSERT INTO agent_wallets (agent_id, org_id, address) "
                    "SELECT id, org_id, :address FROM agents WHERE org_id = :org AND name = 'payer'"
                ),
                {"address": "0x" + "12" * 20, "org": live_org.id},
            )
        with fake_engine():  # its currencies: USDC on base
            decision = transfers.decide(
                uuid.UUID(execution["id"]), 1, "k", "base", CUSTOMER, "75", "r"
            )
        assert runyard.wallets.get("payer")["address"] == "0x" + "12" * 20
        [listed] = list(runyard.decisions.list(status="awaiting_approval"))
        assert listed["id"] == str(decision.id) and listed["amount"] == "75"
        assert runyard.decisions.get(str(decision.id))["status"] == "awaiting_approval"
        assert runyard.decisions.approve(str(decision.id))["status"] == "queued"
        with pytest.raises(Conflict):
            runyard.decisions.reject(str(decision.id))
