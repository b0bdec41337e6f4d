"""ctx.wallet.transfer with real workers, a real beat and a fake wallet service: the policy
decides before anything leaves, an admin's approval resumes a waiting execution, and a worker
killed after the service accepted a transfer never pays twice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.app.wallets_helpers import CURRENCIES, CUSTOMER, POLICY, STRANGER, fake_engine
from tests.conftest import celery_worker, own_queue, wait_for, wait_until
from tests.fake_engine import TOKEN, FakeEngine
from tests.faults.workers_fixtures import SHORT_LEASES, kill_worker, sweeping_beat

pytestmark = pytest.mark.worker


@pytest.fixture(scope="module")
def engine(app) -> Iterator[FakeEngine]:
    """The fake wallet service, and the in-process API's settings pointing at it."""
    with fake_engine() as fake:
        yield fake


def wallet_env(engine: FakeEngine) -> dict[str, str]:
    return {
        **SHORT_LEASES,
        "RUNYARD_WALLET_ENGINE_URL": engine.url,
        "RUNYARD_WALLET_CURRENCIES": json.dumps(CURRENCIES),
    }


def paying_worker(directory: Path, engine: FakeEngine, queue: str, name: str):
    return celery_worker(directory / f"{name}.log", queues=queue, name=name, env=wallet_env(engine))


@pytest.fixture(scope="module")
def fleet(engine, tmp_path_factory) -> Iterator[str]:
    """A worker of the wallet service's settings on a queue of its own, and a beat that wakes
    durable waits and sweeps with short leases; the queue's name."""
    directory = tmp_path_factory.mktemp("wallets")
    queue = own_queue("wallets")
    with sweeping_beat(directory), paying_worker(directory, engine, queue, "payer"):
        yield queue


def payer(client, org, queue: str, name: str = "payer") -> dict:
    """An agent that pays, with the service's token as a secret and a wallet."""
    token = client.put(
        "/api/v1/secrets/wallet-engine-token", json={"value": TOKEN}, headers=org.headers
    )
    assert token.status_code == 200, token.get_json()
    body = {
        "name": name,
        "runtime": {"type": "python", "entrypoint": "tests.agents:pays"},
        "capabilities": [{"name": "payments.refund", "chains": ["base"]}],
        "wallet_policy": POLICY,
        "queue": queue,
        "retry": {"max_retries": 3, "backoff_seconds": 0, "retry_on": ["lost"]},
    }
    created = client.post("/api/v1/agents", json=body, headers=org.headers)
    assert created.status_code == 201, created.get_json()
    wallet = client.post(f"/api/v1/agents/{name}/wallet", json={}, headers=org.headers)
    assert wallet.status_code == 201, wallet.get_json()
    return wallet.get_json()


def pay(client, org, amount: str, to: str = CUSTOMER, agent: str = "payer") -> str:
    body = {"input": {"chain": "base", "to": to, "amount": amount, "reason": "refund A-17"}}
    response = client.post(f"/api/v1/agents/{agent}/executions", json=body, headers=org.headers)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def ending(client, org, done: dict) -> str:
    """What a failed assertion shows of an ended execution (pytest cuts a dict short): its
    status, error and output, its earlier attempts, and its log, where an agent's traceback
    goes."""
    path = f"/api/v1/executions/{done['id']}"
    shown = {key: done.get(key) for key in ("status", "attempts", "error", "output")}
    shown["earlier_attempts"] = client.get(f"{path}/attempts", headers=org.headers).get_json()
    shown["log"] = client.get(f"{path}/logs", headers=org.headers).get_json()
    return json.dumps(shown, default=str)


def lines_naming(execution_id: str, logs: list[Path]) -> str:
    """The lines of the workers' logs that name the execution."""
    return "".join(
        line
        for log in logs
        for line in log.read_text(errors="replace").splitlines(keepends=True)
        if execution_id in line
    )


def decisions_of(client, org, execution_id: str) -> list[dict]:
    response = client.get(
        "/api/v1/decisions", query_string={"execution_id": execution_id}, headers=org.headers
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_a_transfer_within_policy_reaches_the_service_once_and_is_followed_to_mined(
    live_client, live_org, engine, fleet
):
    wallet = payer(live_client, live_org, fleet)
    before = len(engine.transfers())
    execution_id = pay(live_client, live_org, "20.50")
    done = wait_for(live_client, live_org, execution_id, timeout=60)
    assert done["status"] == "succeeded", ending(live_client, live_org, done)
    paid = done["output"]["paid"]
    assert paid["status"] == "mined" and paid["queue_id"]
    assert done["output"]["address"] == wallet["address"]
    (decision,) = decisions_of(live_client, live_org, execution_id)
    assert decision["id"] == paid["decision_id"] and decision["status"] == "mined"
    assert decision["amount"] == "20.5" and decision["transaction_hash"]
    calls = engine.transfers()[before:]
    assert len(calls) == 1
    call = calls[0]
    assert call.path == "/backend-wallet/base/transfer"
    assert call.headers["authorization"] == f"Bearer {TOKEN}"
    assert call.headers["x-backend-wallet-address"] == wallet["address"]
    assert call.headers["x-idempotency-key"] == f"runyard-decision-{decision['id']}"
    assert call.body["to"] == CUSTOMER and call.body["amount"] == "20.5"
    kinds = [
        entry["name"]
        for entry in live_client.get(
            f"/api/v1/executions/{execution_id}/journal", headers=live_org.headers
        ).get_json()
        if entry["kind"] == "step"
    ]
    assert kinds[:2] == ["wallet.decide", "wallet.send"] and "wallet.status" in kinds


def test_refusals_never_reach_the_service(live_client, live_org, engine, fleet):
    payer(live_client, live_org, fleet)
    before = len(engine.transfers())
    over = pay(live_client, live_org, "150")
    stranger = pay(live_client, live_org, "5", to=STRANGER)
    for execution_id, says in ((over, "max_per_transaction"), (stranger, "recipient")):
        done = wait_for(live_client, live_org, execution_id, timeout=30)
        assert done["status"] == "succeeded", ending(live_client, live_org, done)
        assert says in done["output"]["refused"], done["output"]
        (decision,) = decisions_of(live_client, live_org, execution_id)
        assert decision["status"] == "refused" and decision["error"] in done["output"]["refused"]
    assert len(engine.transfers()) == before


def test_above_approval_over_the_execution_waits_for_an_admin(live_client, live_org, engine, fleet):
    payer(live_client, live_org, fleet)
    approved, rejected = pay(live_client, live_org, "60"), pay(live_client, live_org, "70")
    for execution_id in (approved, rejected):
        wait_until(
            lambda execution_id=execution_id: (
                live_client.get(
                    f"/api/v1/executions/{execution_id}", headers=live_org.headers
                ).get_json()["status"]
                == "waiting"
            ),
            timeout=30,
        )
    before = len(engine.transfers())
    answers = {}
    for execution_id, verb in ((approved, "approve"), (rejected, "reject")):
        (decision,) = decisions_of(live_client, live_org, execution_id)
        assert decision["status"] == "awaiting_approval"
        answer = live_client.post(
            f"/api/v1/decisions/{decision['id']}/{verb}", headers=live_org.headers
        )
        assert answer.status_code == 200, answer.get_json()
        answers[execution_id] = decision["id"]
    done = wait_for(live_client, live_org, approved, timeout=60)
    assert done["output"]["paid"]["status"] == "mined", done
    refused = wait_for(live_client, live_org, rejected, timeout=60)
    assert "rejected" in refused["output"]["refused"], refused
    assert len(engine.transfers()) == before + 1


def test_a_worker_killed_after_the_service_accepted_the_transfer_pays_once(
    live_client, live_org, engine, fleet, tmp_path
):
    """The service queues the transfer and holds its answer; the worker dies meanwhile. The
    attempt is lost, the next one replays: its send repeats the idempotency key, and the
    service answers the first queueId instead of paying again."""
    queue = own_queue("wallets-kill")
    payer(live_client, live_org, queue, name="payer-killed")
    engine.transfer_answer_delay = 3.0
    try:
        with paying_worker(tmp_path, engine, queue, "doomed") as doomed:
            before = len(engine.transfers())
            execution_id = pay(live_client, live_org, "25", agent="payer-killed")
            wait_until(lambda: len(engine.transfers()) > before, timeout=30)
            kill_worker(doomed)
        engine.transfer_answer_delay = 0.0
        with paying_worker(tmp_path, engine, queue, "heir"):
            done = wait_for(live_client, live_org, execution_id, timeout=60)
    finally:
        engine.transfer_answer_delay = 0.0
    assert done["status"] == "succeeded" and done["attempts"] == 2, (
        f"{ending(live_client, live_org, done)}\n"
        + lines_naming(execution_id, [tmp_path / "doomed.log", tmp_path / "heir.log"])
    )
    assert done["output"]["paid"]["status"] == "mined"
    calls = engine.transfers()[before:]
    keys = {call.headers["x-idempotency-key"] for call in calls}
    assert len(calls) == 2 and len(keys) == 1, calls
    queued = {queue_id for key, queue_id in engine.by_key.items() if key in keys}
    assert len(queued) == 1
    (decision,) = decisions_of(live_client, live_org, execution_id)
    assert decision["queue_id"] in queued and decision["status"] == "mined"


def test_a_script_agent_transfers_too(live_client, live_org, engine, fleet):
    payer(live_client, live_org, fleet)
    source = (
        "def main(input, ctx):\n"
        "    try:\n"
        "        return ctx.wallet.transfer('base', input['to'], input['amount'], 'script')\n"
        "    except TransferRefused as refused:\n"
        "        return {'refused': refused.reason}\n"
    )
    body = {
        "name": "script-payer",
        "runtime": {"type": "script", "language": "python", "source": source},
        "capabilities": ["payments.refund"],
        "wallet_policy": POLICY,
        "queue": fleet,
    }
    assert (
        live_client.post("/api/v1/agents", json=body, headers=live_org.headers).status_code == 201
    )
    wallet = live_client.post(
        "/api/v1/agents/script-payer/wallet", json={}, headers=live_org.headers
    )
    assert wallet.status_code == 201
    paid = pay(live_client, live_org, "3", agent="script-payer")
    refused = pay(live_client, live_org, "101", agent="script-payer")
    assert wait_for(live_client, live_org, paid, timeout=60)["output"]["status"] == "mined"
    output = wait_for(live_client, live_org, refused, timeout=60)["output"]
    assert "max_per_transaction" in output["refused"]


def test_the_example_refund_agent_pays_waits_for_approval_and_is_refused(
    live_client, live_org, engine, fleet
):
    """runyard_examples.payments: refund-order as `runyard up` loads it (on the fleet's queue).
    Its decision record, audit events and the calls the service saw are printed (`-s`)."""
    from runyard_examples import AGENTS

    example = next(agent for agent in AGENTS if agent["name"] == "refund-order")
    token = live_client.put(
        "/api/v1/secrets/wallet-engine-token", json={"value": TOKEN}, headers=live_org.headers
    )
    assert token.status_code == 200
    created = live_client.post(
        "/api/v1/agents", json={**example, "queue": fleet}, headers=live_org.headers
    )
    assert created.status_code == 201, created.get_json()
    wallet = live_client.post(
        "/api/v1/agents/refund-order/wallet", json={}, headers=live_org.headers
    )
    assert wallet.status_code == 201

    def refund(amount: str) -> str:
        body = {"input": {"order_id": "A-17", "amount": amount, "to": CUSTOMER}}
        response = live_client.post(
            "/api/v1/agents/refund-order/executions", json=body, headers=live_org.headers
        )
        assert response.status_code == 202, response.get_json()
        return response.get_json()["id"]

    before = len(engine.transfers())
    small, large, too_large = refund("12.5"), refund("75"), refund("150")
    assert wait_for(live_client, live_org, small, timeout=60)["output"]["status"] == "mined"
    refused = wait_for(live_client, live_org, too_large, timeout=60)["output"]
    assert refused["status"] == "refused" and "max_per_transaction" in refused["reason"]
    wait_until(
        lambda: (
            [d["status"] for d in decisions_of(live_client, live_org, large)]
            == ["awaiting_approval"]
        ),
        timeout=30,
    )
    (waiting,) = decisions_of(live_client, live_org, large)
    approved = live_client.post(
        f"/api/v1/decisions/{waiting['id']}/approve", headers=live_org.headers
    )
    assert approved.status_code == 200, approved.get_json()
    assert wait_for(live_client, live_org, large, timeout=60)["output"]["status"] == "mined"
    assert len(engine.transfers()) == before + 2

    (decision,) = decisions_of(live_client, live_org, small)
    trail = live_client.get(
        "/api/v1/audit", query_string={"object_id": decision["id"]}, headers=live_org.headers
    ).get_json()
    assert [event["action"] for event in reversed(trail)][:2] == [
        "decision.create",
        "decision.send",
    ]
    print(json.dumps({"decision": decision, "audit": trail}, indent=1))
    for call in engine.transfers()[before:]:
        print(
            call.method,
            call.path,
            {k: v for k, v in call.headers.items() if k.startswith("x-")},
            call.body,
        )


def test_a_wallet_service_down_mid_transfer_is_waited_out_and_pays_once(
    live_client, live_org, engine, fleet
):
    """The service fails the send, then a status poll: the transfer records each failure, sleeps
    and asks again with the same decision and key, so it neither fails the run nor pays twice."""
    payer(live_client, live_org, fleet)
    before = len(engine.transfers())
    engine.fail_with(503, "engine restarting")
    try:
        execution_id = pay(live_client, live_org, "7")
        wait_until(lambda: len(engine.transfers()) >= before + 2, timeout=30)
    finally:
        engine.failure = None
    done = wait_for(live_client, live_org, execution_id, timeout=60)
    assert done["status"] == "succeeded" and done["output"]["paid"]["status"] == "mined", ending(
        live_client, live_org, done
    )
    calls = engine.transfers()[before:]
    assert len(calls) >= 3 and len({call.headers["x-idempotency-key"] for call in calls}) == 1
    (decision,) = decisions_of(live_client, live_org, execution_id)
    assert len([q for q in engine.transactions if q == decision["queue_id"]]) == 1
    journal = live_client.get(
        f"/api/v1/executions/{execution_id}/journal", headers=live_org.headers
    ).get_json()
    sends = [entry["result"] for entry in journal if entry["name"] == "wallet.send"]
    assert "engine restarting" in sends[0]["unavailable"] and sends[-1]["queue_id"]
