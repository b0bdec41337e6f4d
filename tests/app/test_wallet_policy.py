"""wallet_policy in an agent's definition: checked (422 by pointer), versioned, and a tightened
policy named as breaking in the version diff (a loosened one is not)."""

from __future__ import annotations

import pytest

from tests.app.wallets_helpers import CUSTOMER, PAYER, POLICY, ok

BAD = [
    ({"max_per_transaction": "0"}, "/wallet_policy/max_per_transaction"),
    ({"max_per_transaction": "-5"}, "/wallet_policy/max_per_transaction"),
    ({"max_per_day": "1.0000000000000000001"}, "/wallet_policy/max_per_day"),
    ({"max_per_day": 100}, "/wallet_policy/max_per_day"),
    ({"approval_over": "100.01"}, "/wallet_policy/approval_over"),
    ({"max_per_transaction": "251"}, "/wallet_policy/max_per_transaction"),
    ({"chains": []}, "/wallet_policy/chains"),
    ({"recipients": ["0x12"]}, "/wallet_policy/recipients/0"),
    ({"surprise": 1}, "/wallet_policy"),
]


@pytest.mark.parametrize(("change", "pointer"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_a_bad_policy_is_422_by_pointer(client, org, change, pointer):
    body = {**PAYER, "wallet_policy": {**POLICY, **change}}
    response = client.post("/api/v1/agents", json=body, headers=org.headers)
    answer = response.get_json()
    assert response.status_code == 422, answer
    assert any(key.startswith(pointer) for key in answer["errors"]), answer["errors"]
    assert answer["hint"]


def test_the_policy_is_versioned_shown_and_removed_with_null(client, org):
    agent = ok(client.post("/api/v1/agents", json=PAYER, headers=org.headers), 201)
    assert agent["wallet_policy"] == POLICY
    patched = ok(
        client.patch("/api/v1/agents/payer", json={"wallet_policy": None}, headers=org.headers),
        200,
    )
    assert patched["wallet_policy"] is None and patched["current_version"] == "1.0.1"
    old = ok(client.get("/api/v1/agents/payer/versions/1.0.0", headers=org.headers), 200)
    assert old["wallet_policy"] == POLICY
    same = client.patch("/api/v1/agents/payer", json={"wallet_policy": None}, headers=org.headers)
    assert same.get_json()["current_version"] == "1.0.1", "no change, no version"


def breaks_after(client, org, policy) -> list[dict]:
    ok(
        client.patch("/api/v1/agents/payer", json={"wallet_policy": policy}, headers=org.headers),
        200,
    )
    current = ok(client.get("/api/v1/agents/payer", headers=org.headers), 200)["current_version"]
    diff = client.get(
        f"/api/v1/agents/payer/versions/{current}/diff",
        query_string={"against": "1.0.0"},
        headers=org.headers,
    )
    return [b for b in ok(diff, 200)["breaking"] if b["path"].startswith("/wallet_policy")]


TIGHTER = [
    ({**POLICY, "max_per_day": "200"}, "/wallet_policy/max_per_day"),
    ({**POLICY, "max_per_transaction": "99"}, "/wallet_policy/max_per_transaction"),
    ({**POLICY, "chains": ["base"]}, "/wallet_policy/chains"),
    ({**POLICY, "approval_over": "10"}, "/wallet_policy/approval_over"),
    ({**POLICY, "recipients": ["0x" + "ef" * 20]}, "/wallet_policy/recipients"),
    ({**POLICY, "currency": "USDT"}, "/wallet_policy/currency"),
    (None, "/wallet_policy"),
]


@pytest.mark.parametrize(
    ("policy", "pointer"), TIGHTER, ids=[t[1] + str(i) for i, t in enumerate(TIGHTER)]
)
def test_a_tightened_policy_is_breaking(client, org, policy, pointer):
    ok(client.post("/api/v1/agents", json=PAYER, headers=org.headers), 201)
    assert [b["path"] for b in breaks_after(client, org, policy)] == [pointer]


def test_a_loosened_policy_is_not_breaking(client, org):
    ok(client.post("/api/v1/agents", json=PAYER, headers=org.headers), 201)
    looser = {
        **{
            key: value
            for key, value in POLICY.items()
            if key not in ("recipients", "approval_over")
        },
        "max_per_day": "10000",
        "max_per_transaction": "500",
        "chains": ["base", "polygon", "ethereum"],
    }
    assert breaks_after(client, org, looser) == []
    recipients = {**POLICY, "recipients": [CUSTOMER.upper().replace("0X", "0x"), "0x" + "ef" * 20]}
    assert breaks_after(client, org, recipients) == []
