"""Wallets and transfers against a fake wallet service (tests/fake_engine.py): a wallet made
and the 502 when the service is down (nothing stored); a decision within policy sent once with
the right headers and followed to `mined`; refusals that never reach the service (per
transaction, per day under concurrent decides, chain, recipient, authority); approval and
rejection, and the internal event that resumes the waiting execution."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import text

from app.durable import waits
from app.durable.journal import Fenced
from app.errors import NotFound, ValidationFailed
from app.wallets import transfers
from app.wallets.engine import WalletServiceFailed
from tests.app.wallets_helpers import (
    CUSTOMER,
    PAYER,
    STRANGER,
    USDC_BASE,
    fake_engine,
    ok,
    paying_agent,
    running_execution,
)
from tests.conftest import bearer, make_token, unserved_queue
from tests.fake_engine import TOKEN


@pytest.fixture
def engine():
    with fake_engine() as fake:
        yield fake


def audit_actions(connection, org) -> list[str]:
    return list(
        connection.execute(
            text("SELECT action FROM audit_events WHERE org_id = :org ORDER BY id"),
            {"org": org.id},
        ).scalars()
    )


# ---------------------------------------------------------------------------------------------
# Wallets


def test_a_wallet_is_made_by_the_service_and_stored_once(client, org, engine, connection):
    agent = paying_agent(client, org)
    [create] = [call for call in engine.calls if call.path == "/backend-wallet/create"]
    assert create.headers["authorization"] == f"Bearer {TOKEN}"
    assert create.body == {"label": f"runyard {org.name}/payer"}
    wallet = ok(client.get("/api/v1/agents/payer/wallet", headers=org.headers), 200)
    assert set(wallet) == {"address", "label", "provider", "created_at"}
    assert wallet["provider"] == "engine" and wallet["address"].startswith("0x")
    again = client.post(f"/api/v1/agents/{agent['id']}/wallet", json={}, headers=org.headers)
    assert again.status_code == 409 and again.get_json()["hint"]
    assert len(engine.calls) == 1, "a second wallet is refused before the service is asked"
    assert audit_actions(connection, org).count("wallet.create") == 1


@pytest.mark.parametrize("outage", ["down", "error", "bad token"])
def test_the_service_failing_is_502_with_a_hint_and_nothing_is_stored(
    client, org, engine, connection, outage
):
    client.put("/api/v1/secrets/wallet-engine-token", json={"value": TOKEN}, headers=org.headers)
    ok(
        client.post(
            "/api/v1/agents",
            json={
                "name": "payer",
                "runtime": {"type": "python", "entrypoint": "tests.agents:echo"},
            },
            headers=org.headers,
        ),
        201,
    )
    if outage == "down":
        engine.stop()
    elif outage == "error":
        engine.fail_with(500)
    else:
        client.put(
            "/api/v1/secrets/wallet-engine-token", json={"value": "wrong"}, headers=org.headers
        )
    before = audit_actions(connection, org)
    response = client.post("/api/v1/agents/payer/wallet", json={"label": "x"}, headers=org.headers)
    body = response.get_json()
    assert response.status_code == 502, body
    assert body["hint"] and "wallet service" in body["message"]
    assert client.get("/api/v1/agents/payer/wallet", headers=org.headers).status_code == 404
    assert audit_actions(connection, org) == before


def test_wallet_routes_need_an_admin_to_write_and_any_role_to_read(client, org, engine):
    from tests.conftest import bearer, make_token

    paying_agent(client, org)
    for role in ("developer", "operator", "viewer"):
        headers = bearer(make_token(org, role))
        response = client.post("/api/v1/agents/payer/wallet", json={}, headers=headers)
        assert response.status_code == 403, role
        assert client.get("/api/v1/agents/payer/wallet", headers=headers).status_code == 200


# ---------------------------------------------------------------------------------------------
# Deciding, sending, following


def test_a_transfer_within_policy_reaches_the_service_once_and_is_followed_to_mined(
    client, org, engine, connection
):
    paying_agent(client, org)
    execution_id = running_execution(client, org)
    decision = transfers.decide(execution_id, 1, "refund-1", "base", CUSTOMER, "12.50", "order 7")
    assert decision.status == "queued" and decision.queue_id is None
    assert decision.amount == "12.5" and decision.currency == "USDC"
    assert all(rule["passed"] for rule in decision.policy_check["rules"].values())
    assert not engine.transfers(), "deciding calls nobody"
    # Asked again (a replay): the same decision, unchanged.
    assert transfers.decide(execution_id, 1, "refund-1", "base", CUSTOMER, "99", "x") == decision

    sent = transfers.send(decision.id)
    assert transfers.send(decision.id) == sent, "a second send finds it sent"
    [call] = engine.transfers()
    wallet = ok(client.get("/api/v1/agents/payer/wallet", headers=org.headers), 200)
    assert call.path == "/backend-wallet/base/transfer"
    assert call.headers["authorization"] == f"Bearer {TOKEN}"
    assert call.headers["x-backend-wallet-address"] == wallet["address"]
    assert call.headers["x-idempotency-key"] == transfers.service_key(decision.id)
    assert call.body == {"to": CUSTOMER, "amount": "12.5", "currencyAddress": USDC_BASE}
    assert sent.status == "queued" and sent.queue_id

    statuses = [transfers.refresh(decision.id).status for _ in range(3)]
    assert statuses == ["queued", "sent", "mined"]
    final = transfers.refresh(decision.id)
    assert final.status == "mined" and final.transaction_hash.startswith("0x")
    shown = ok(client.get(f"/api/v1/decisions/{decision.id}", headers=org.headers), 200)
    assert shown["status"] == "mined" and shown["amount"] == "12.5"
    assert shown["execution_id"] == str(execution_id) and shown["agent"] == "payer"
    actions = audit_actions(connection, org)
    assert [a for a in actions if a.startswith("decision.")] == [
        "decision.create",
        "decision.send",
        "decision.status",
        "decision.status",
    ]


def test_a_send_retried_after_a_lost_answer_pays_once(client, org, engine, connection):
    """The service took the transfer but the record was lost (a worker killed in between):
    the next send carries the same key, and the service answers the same queueId."""
    paying_agent(client, org)
    decision = transfers.decide(running_execution(client, org), 1, "k", "base", CUSTOMER, "5", None)
    first = transfers.send(decision.id)
    connection.execute(
        text("UPDATE decisions SET queue_id = NULL WHERE id = :id"), {"id": decision.id}
    )
    again = transfers.send(decision.id)
    assert again.queue_id == first.queue_id
    assert len(engine.transfers()) == 2 and len(engine.transactions) == 1


def test_a_send_that_fails_records_nothing_and_may_be_tried_again(client, org, engine):
    paying_agent(client, org)
    decision = transfers.decide(running_execution(client, org), 1, "k", "base", CUSTOMER, "5", None)
    engine.fail_with(503)
    with pytest.raises(WalletServiceFailed):
        transfers.send(decision.id)
    assert transfers.refresh(decision.id).queue_id is None
    engine.failure = None
    assert transfers.send(decision.id).queue_id is not None


def test_an_errored_or_cancelled_transaction_is_errored(client, org, engine):
    paying_agent(client, org)
    execution_id = running_execution(client, org)
    for key, final in (("a", "errored"), ("b", "cancelled")):
        decision = transfers.send(
            transfers.decide(execution_id, 1, key, "base", CUSTOMER, "1", None).id
        )
        engine.final_status = final
        followed = transfers.refresh(decision.id)
        assert followed.status == "errored" and followed.error
        assert transfers.refresh(decision.id) == followed, "final"
        engine.final_status = None


REFUSALS = [
    ("over max_per_transaction", {}, dict(amount="100.01"), "max_per_transaction"),
    ("a chain not allowed", {}, dict(chain="ethereum"), "chain"),
    ("a recipient not listed", {}, dict(to=STRANGER), "recipient"),
    (
        "authority observe",
        {"capabilities": [{"name": "payments.refund", "authority": "observe"}]},
        {},
        "authority",
    ),
    (
        "authority propose",
        {"capabilities": [{"name": "payments.refund", "authority": "propose"}]},
        {},
        "authority",
    ),
    ("no policy", {"wallet_policy": None}, {}, "policy"),
]


@pytest.mark.parametrize(("why", "agent", "asked", "rule"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_never_reach_the_service(client, org, engine, connection, why, agent, asked, rule):
    paying_agent(client, org, **agent)
    request = {"chain": "base", "to": CUSTOMER, "amount": "10", **asked}
    decision = transfers.decide(running_execution(client, org), 1, "k", reason=why, **request)
    assert decision.status == "refused", decision
    assert decision.policy_check["rules"][rule]["passed"] is False
    assert decision.error == decision.policy_check["rules"][rule]["detail"]
    assert transfers.send(decision.id).status == "refused"
    assert not engine.transfers()


def test_a_plain_capability_name_counts_as_execute(client, org, engine):
    paying_agent(client, org, capabilities=["payments.refund"])
    decision = transfers.decide(running_execution(client, org), 1, "k", "base", CUSTOMER, "1", None)
    assert decision.status == "queued"


def test_an_agent_without_a_wallet_is_refused(client, org, engine):
    client.post(
        "/api/v1/agents",
        json=PAYER,
        headers=org.headers,
    )
    decision = transfers.decide(running_execution(client, org), 1, "k", "base", CUSTOMER, "1", None)
    assert decision.status == "refused" and not decision.policy_check["rules"]["wallet"]["passed"]


def test_malformed_requests_and_stale_attempts_are_not_decisions(client, org, engine, connection):
    paying_agent(client, org)
    execution_id = running_execution(client, org)
    for amount in ("0", "-1", "1e3", "1.0000000000000000001", "abc"):
        with pytest.raises(ValidationFailed):
            transfers.decide(execution_id, 1, "k", "base", CUSTOMER, amount, None)
    with pytest.raises(ValidationFailed):
        transfers.decide(execution_id, 1, "k", "base", "0x12", "1", None)
    with pytest.raises(Fenced):
        transfers.decide(execution_id, 2, "k", "base", CUSTOMER, "1", None)
    count = connection.execute(text("SELECT count(*) FROM decisions")).scalar()
    assert count == 0


def test_the_day_counts_what_was_allowed_and_what_awaits_approval(client, org, engine):
    paying_agent(client, org)
    execution_id = running_execution(client, org)
    statuses = [
        transfers.decide(execution_id, 1, f"k{n}", "base", CUSTOMER, amount, None).status
        for n, amount in enumerate(("100", "100", "40", "20"))
    ]
    # 100 and 100 await approval (over 50), 40 is queued: 240; 20 more is over 250.
    assert statuses == ["awaiting_approval", "awaiting_approval", "queued", "refused"]


def test_concurrent_decides_of_one_agent_never_pass_the_daily_limit(app, live_org):
    """Ten executions of one agent decide at once: the queued ones sum to at most max_per_day."""
    client = app.test_client()
    # Committed executions on `default` would be the session worker's to claim and finish
    # before they decide (a fenced decide).
    with fake_engine() as engine, unserved_queue("wallets") as queue:
        policy = {"max_per_transaction": "40", "max_per_day": "100", "currency": "USDC"}
        paying_agent(client, live_org, queue=queue, wallet_policy={**policy, "chains": ["base"]})
        executions = [running_execution(client, live_org) for _ in range(10)]
        barrier = threading.Barrier(10)
        decided = []

        def decide(execution_id):
            barrier.wait()
            decided.append(transfers.decide(execution_id, 1, "pay", "base", CUSTOMER, "30", None))

        threads = [threading.Thread(target=decide, args=(e,)) for e in executions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(decided) == 10
        queued = [d for d in decided if d.status == "queued"]
        assert len(queued) == 3, [d.status for d in decided]
        assert all(d.status == "refused" for d in decided if d.status != "queued")
        assert not engine.transfers()


# ---------------------------------------------------------------------------------------------
# Approval


def awaiting(client, org) -> tuple[uuid.UUID, transfers.Decision]:
    paying_agent(client, org)
    execution_id = running_execution(client, org)
    decision = transfers.decide(execution_id, 1, "big", "base", CUSTOMER, "75", "a big refund")
    assert decision.status == "awaiting_approval"
    assert "approval" in decision.policy_check
    return execution_id, decision


def wait_for_the_answer(connection, org, execution_id, decision_id) -> None:
    """What the worker side does: wait for runyard.decision matching the decision, suspended."""
    waits.register(
        connection,
        org.id,
        execution_id,
        1,
        1,
        "runyard.decision",
        {"decision_id": str(decision_id)},
        3600,
        0,
    )
    connection.execute(
        text("UPDATE executions SET status = 'waiting' WHERE id = :id"), {"id": execution_id}
    )


@pytest.mark.parametrize("approve", [True, False], ids=["approve", "reject"])
def test_an_answer_wakes_the_waiting_execution(client, org, engine, connection, approve):
    execution_id, decision = awaiting(client, org)
    wait_for_the_answer(connection, org, execution_id, decision.id)
    verb, status = ("approve", "queued") if approve else ("reject", "rejected")
    answered = ok(client.post(f"/api/v1/decisions/{decision.id}/{verb}", headers=org.headers), 200)
    assert answered["status"] == status
    assert answered["approved_by"]["token_name"]
    row = connection.execute(
        text("SELECT status FROM executions WHERE id = :id"), {"id": execution_id}
    ).scalar()
    assert row == "queued", "resumed"
    result = connection.execute(
        text("SELECT status, result FROM execution_journal WHERE execution_id = :id"),
        {"id": execution_id},
    ).one()
    assert result.status == "received"
    assert result.result == {"decision_id": str(decision.id), "status": status}
    again = client.post(f"/api/v1/decisions/{decision.id}/approve", headers=org.headers)
    assert again.status_code == 409 and again.get_json()["hint"]
    actions = audit_actions(connection, org)
    assert actions.count(f"decision.{verb}") == 1
    assert not engine.transfers(), "an answer sends nothing: the resumed execution does"


def test_only_an_admin_answers_and_only_what_awaits(client, org, engine, connection):
    from tests.conftest import bearer, make_token

    execution_id, decision = awaiting(client, org)
    for role in ("developer", "operator", "viewer"):
        headers = bearer(make_token(org, role))
        for verb in ("approve", "reject"):
            response = client.post(f"/api/v1/decisions/{decision.id}/{verb}", headers=headers)
            assert response.status_code == 403, (role, verb)
        assert client.get(f"/api/v1/decisions/{decision.id}", headers=headers).status_code == 200
    allowed = transfers.decide(execution_id, 1, "small", "base", CUSTOMER, "5", None)
    for verb in ("approve", "reject"):
        response = client.post(f"/api/v1/decisions/{allowed.id}/{verb}", headers=org.headers)
        assert response.status_code == 409


def test_an_approval_of_an_ended_execution_is_409(client, org, engine, connection):
    execution_id, decision = awaiting(client, org)
    connection.execute(
        text("UPDATE executions SET status = 'cancelled', finished_at = now() WHERE id = :id"),
        {"id": execution_id},
    )
    response = client.post(f"/api/v1/decisions/{decision.id}/approve", headers=org.headers)
    assert response.status_code == 409
    ok(client.post(f"/api/v1/decisions/{decision.id}/reject", headers=org.headers), 200)


def test_clients_may_not_send_runyards_own_events(client, org):
    response = client.post(
        "/api/v1/events",
        json={"name": "runyard.decision", "data": {"decision_id": "x", "status": "queued"}},
        headers=org.headers,
    )
    assert response.status_code == 422 and "/name" in response.get_json()["errors"]


# ---------------------------------------------------------------------------------------------
# Listing, tenancy, retention


def test_decisions_are_listed_newest_first_and_filtered(client, org, engine):
    paying_agent(client, org)
    execution_id = running_execution(client, org)
    made = [
        transfers.decide(execution_id, 1, f"k{n}", "base", CUSTOMER, amount, None)
        for n, amount in enumerate(("1", "75", "500"))
    ]
    listed = ok(client.get("/api/v1/decisions", headers=org.headers), 200)
    assert [d["id"] for d in listed] == [str(d.id) for d in reversed(made)]
    for query, expected in (
        ({"status": "refused"}, [made[2]]),
        ({"status": "awaiting_approval"}, [made[1]]),
        ({"agent": "payer", "execution_id": str(execution_id)}, list(reversed(made))),
        ({"agent": "other"}, []),
    ):
        found = ok(client.get("/api/v1/decisions", query_string=query, headers=org.headers), 200)
        assert [d["id"] for d in found] == [str(d.id) for d in expected], query


def test_another_organization_sees_no_wallet_and_no_decision(client, org, other_org, engine):
    _execution_id, decision = awaiting(client, org)
    for method, path in (
        ("GET", "/api/v1/agents/payer/wallet"),
        ("POST", "/api/v1/agents/payer/wallet"),
        ("GET", f"/api/v1/decisions/{decision.id}"),
        ("POST", f"/api/v1/decisions/{decision.id}/approve"),
        ("POST", f"/api/v1/decisions/{decision.id}/reject"),
    ):
        response = client.open(
            path, method=method, json={} if method == "POST" else None, headers=other_org.headers
        )
        assert response.status_code == 404, path
    assert ok(client.get("/api/v1/decisions", headers=other_org.headers), 200) == []
    assert transfers.refresh(decision.id).status == "awaiting_approval"


def test_decisions_outlive_their_executions(client, org, engine, connection):
    paying_agent(client, org)
    execution_id = running_execution(client, org)
    decision = transfers.decide(execution_id, 1, "k", "base", CUSTOMER, "1", None)
    connection.execute(text("DELETE FROM executions WHERE id = :id"), {"id": execution_id})
    shown = ok(client.get(f"/api/v1/decisions/{decision.id}", headers=org.headers), 200)
    assert shown["execution_id"] is None and shown["status"] == "queued"


# ---------------------------------------------------------------------------------------------
# Found by review: whose wallet, whose decision, how long a send may be tried, who sets a policy


def test_a_catalog_run_never_spends_the_owners_wallet(client, org, other_org, engine, connection):
    """A public paying agent run by another organization: the run is that organization's, it
    has no wallet of its own for the agent, so its transfer is refused and nobody is paid."""
    paying_agent(client, org, visibility="public")
    run = client.post(
        f"/api/v1/catalog/{org.name}/payer/executions",
        json={"input": {}},
        headers=other_org.headers,
    )
    execution_id = ok(run, 202)["id"]
    connection.execute(
        text("UPDATE executions SET status = 'running', attempt = 1 WHERE id = :id"),
        {"id": execution_id},
    )
    decision = transfers.decide(
        uuid.UUID(execution_id), 1, "k", "base", CUSTOMER, "5", "catalog run"
    )
    assert decision.status == "refused" and not decision.policy_check["rules"]["wallet"]["passed"]
    assert transfers.send(decision.id).queue_id is None
    assert not engine.transfers()


def test_an_execution_moves_only_its_own_decisions(client, org, engine):
    paying_agent(client, org)
    decision = transfers.decide(running_execution(client, org), 1, "k", "base", CUSTOMER, "5", None)
    other = running_execution(client, org)
    with pytest.raises(NotFound):
        transfers.send(decision.id, other)
    with pytest.raises(NotFound):
        transfers.refresh(decision.id, other)
    assert not engine.transfers()


def test_a_send_begun_over_23_hours_ago_is_not_tried_again(client, org, engine, connection):
    """The service keeps an idempotency key 24 hours: past that a second send could pay twice."""
    paying_agent(client, org)
    decision = transfers.decide(running_execution(client, org), 1, "k", "base", CUSTOMER, "5", None)
    connection.execute(
        text("UPDATE decisions SET send_started_at = now() - interval '24 hours' WHERE id = :id"),
        {"id": decision.id},
    )
    with pytest.raises(WalletServiceFailed, match="not sent again"):
        transfers.send(decision.id)
    assert not engine.transfers()


def test_an_approval_that_never_came_refuses_the_decision_for_good(client, org, engine):
    paying_agent(client, org)
    execution_id = running_execution(client, org)
    waiting = transfers.decide(execution_id, 1, "k", "base", CUSTOMER, "60", None)
    assert waiting.status == "awaiting_approval"
    expired = transfers.expire(waiting.id, execution_id, "no approval within 604800s")
    assert expired.status == "refused" and expired.error == "no approval within 604800s"
    late = client.post(f"/api/v1/decisions/{waiting.id}/approve", headers=org.headers)
    assert late.status_code == 409
    # An answer that came first wins: expire returns it as it is.
    answered = transfers.decide(execution_id, 1, "k2", "base", CUSTOMER, "55", None)
    ok(client.post(f"/api/v1/decisions/{answered.id}/approve", headers=org.headers), 200)
    assert transfers.expire(answered.id, execution_id, "too late").status == "queued"


def test_only_an_admin_sets_or_changes_a_wallet_policy(client, org, engine):
    developer = bearer(make_token(org, "developer"))
    body = {**PAYER, "name": "dev-payer"}
    assert client.post("/api/v1/agents", json=body, headers=developer).status_code == 403
    without = {key: value for key, value in body.items() if key != "wallet_policy"}
    assert client.post("/api/v1/agents", json=without, headers=developer).status_code == 201
    policy = {**PAYER["wallet_policy"], "max_per_day": "1000000"}
    loosened = client.patch(
        "/api/v1/agents/dev-payer", json={"wallet_policy": policy}, headers=developer
    )
    assert loosened.status_code == 403
    ok(
        client.patch(
            "/api/v1/agents/dev-payer", json={"wallet_policy": policy}, headers=org.headers
        ),
        200,
    )
    # Other changes stay a developer's; a rollback across policies is an admin's.
    ok(
        client.patch("/api/v1/agents/dev-payer", json={"timeout_seconds": 99}, headers=developer),
        200,
    )
    back = client.post(
        "/api/v1/agents/dev-payer/rollback", json={"version": "1.0.0"}, headers=developer
    )
    assert back.status_code == 403
