"""Transfers from an agent's wallet: what ctx.wallet.transfer (workers/) calls.

    decide(execution_id, attempt, key, chain, to, amount, reason) -> Decision
    send(decision_id) -> Decision
    refresh(decision_id) -> Decision

`decide` checks the policy and records the decision before anything leaves: idempotent on
(execution, key), so a replayed attempt finds the decision it made. The checks and the
record are one transaction under a lock per agent, so two executions of one agent cannot both
pass the daily limit: the day's sum is counted after the lock, and includes what the other
committed. `send` asks the wallet service to transfer an allowed (or approved) decision, with
an idempotency key made from the decision's id: however often it is called (a retry, a
replay, a worker killed between the service's answer and the record), the service queues one
transaction and answers the same queueId. `refresh` follows it to a final status.

Each function opens its own transactions (app.db: joined to a test's connection in tests) and
never holds one across a call to the wallet service.
"""

from __future__ import annotations

import re
import uuid
from decimal import Decimal
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection

from app.agents import capabilities
from app.agents.wallet_policy import amount as parsed_amount
from app.agents.wallet_policy import shown
from app.audit import services as audit
from app.config import current_config
from app.db import db, driver
from app.durable.journal import Fenced
from app.errors import NotFound, ValidationFailed
from app.wallets import engine
from app.wallets.decisions import COLUMNS, Decision, decided
from app.wallets.models import SPENDING_STATUSES
from app.wallets.tokens import access_token

__all__ = ["Decision", "decide", "refresh", "send", "service_key"]

ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
CHAIN = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,62}")
KEY_MAX = 200
REASON_MAX = 2000
SERVICE_KEY_PREFIX = "runyard-decision-"


def service_key(decision_id: uuid.UUID) -> str:
    """The idempotency key a decision's transfer carries to the wallet service."""
    return f"{SERVICE_KEY_PREFIX}{decision_id}"


def _actor(org_id: uuid.UUID, execution_id: uuid.UUID | None, agent: str) -> audit.Actor:
    """The execution that asked, as its own token is shown (app/orgs/services.py)."""
    return audit.Actor(
        org_id,
        {
            "token_id": None if execution_id is None else str(execution_id),
            "token_name": f"execution {execution_id} ({agent})",
            "role": "execution",
        },
        str(execution_id),
    )


def _checked(key: Any, chain: Any, to: Any, amount: Any, reason: Any) -> Decimal:
    errors: dict[str, list[str]] = {}
    if not isinstance(key, str) or not 1 <= len(key) <= KEY_MAX:
        errors["key"] = [f"1 to {KEY_MAX} characters"]
    if not isinstance(chain, str) or not CHAIN.fullmatch(chain):
        errors["chain"] = ["a chain name as the wallet service knows it, e.g. base"]
    if not isinstance(to, str) or not ADDRESS.fullmatch(to):
        errors["to"] = ["an address: 0x and 40 hexadecimal digits"]
    value = parsed_amount(amount)
    if value is None:
        errors["amount"] = ["a decimal string above 0 with at most 18 decimals"]
    if reason is not None and (not isinstance(reason, str) or len(reason) > REASON_MAX):
        errors["reason"] = [f"a text of at most {REASON_MAX} characters"]
    if errors:
        raise ValidationFailed(
            "the transfer is malformed",
            errors=errors,
            hint='ctx.wallet.transfer("base", "0x...", "12.50", "why")',
        )
    assert value is not None
    return value


_BY_KEY = f"SELECT {COLUMNS} FROM decisions WHERE execution_id = %s AND step_key = %s"
_RUN = """
    SELECT e.org_id, e.agent_id, e.agent_name, e.status, e.attempt, v.capabilities,
           v.wallet_policy, v.version, w.address
    FROM executions e
    JOIN agent_versions v ON v.id = e.version_id
    -- The execution's organization's wallet: a catalog run of another organization's agent has
    -- none, and is refused (it never spends the owner's wallet).
    LEFT JOIN agent_wallets w ON w.agent_id = e.agent_id AND w.org_id = e.org_id
    WHERE e.id = %s
"""
_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
_SPENT_TODAY = f"""
    SELECT coalesce(sum(amount), 0) FROM decisions
    WHERE agent_id = %s AND currency = %s AND status IN {SPENDING_STATUSES!r}
      AND created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
"""
# clock_timestamp(): decisions in the order they were made, even within one transaction.
_INSERT = f"""
    INSERT INTO decisions (id, org_id, agent_id, agent_name, execution_id, step_key, kind, chain,
                           to_address, amount, currency, reason, policy_check, status, error,
                           created_at, updated_at)
    VALUES (%(id)s, %(org_id)s, %(agent_id)s, %(agent_name)s, %(execution_id)s, %(key)s,
            'transfer', %(chain)s, %(to)s, %(amount)s, %(currency)s, %(reason)s, %(policy_check)s,
            %(status)s, %(error)s, clock_timestamp(), clock_timestamp())
    RETURNING {COLUMNS}
"""


def decide(
    execution_id: uuid.UUID,
    attempt: int,
    key: str,
    chain: str,
    to: str,
    amount: str | Decimal,
    reason: str | None,
) -> Decision:
    """The decision on a transfer the execution's attempt asks for: the recorded one when
    `key` was asked before (unchanged), else a new one, `refused` (its `error` says why),
    `awaiting_approval` or `queued` (allowed; sent by `send`). Raises ValidationFailed for a
    malformed request and Fenced when the attempt no longer runs."""
    value = _checked(key, chain, to, amount, reason)
    with db.begin() as conn:
        pg = driver(conn)
        found = pg.execute(_BY_KEY, (execution_id, key)).fetchone()
        if found is not None:
            return decided(found)
        run = pg.execute(_RUN, (execution_id,)).fetchone()
        if run is None or run[3] != "running" or run[4] != attempt:
            raise Fenced(f"execution {execution_id}: attempt {attempt} no longer runs")
        org_id, agent_id, agent_name, _status, _attempt, caps, policy, version, address = run
        # One agent's decisions one at a time: the day's sum below includes every other.
        pg.execute(_LOCK, (f"runyard:wallet:{agent_id}",))
        found = pg.execute(_BY_KEY, (execution_id, key)).fetchone()
        if found is not None:
            return decided(found)
        spent = None
        if policy is not None:
            spent = pg.execute(_SPENT_TODAY, (agent_id, policy["currency"])).fetchone()[0]
        check, status, error = judge(caps, policy, version, address, chain, to, value, spent)
        row = pg.execute(
            _INSERT,
            {
                "id": uuid.uuid4(),
                "org_id": org_id,
                "agent_id": agent_id,
                "agent_name": agent_name,
                "execution_id": execution_id,
                "key": key,
                "chain": chain,
                "to": to,
                "amount": value,
                "currency": policy["currency"] if policy else "",
                "reason": reason,
                "policy_check": Jsonb(check),
                "status": status,
                "error": error,
            },
        ).fetchone()
        decision = decided(row)
        audit.record(
            conn,
            _actor(org_id, execution_id, agent_name),
            audit.Change(
                "decision.create",
                "decision",
                decision.id,
                agent_name,
                [
                    {"op": "add", "path": "/status", "value": status},
                    {"op": "add", "path": "/amount", "value": decision.amount},
                    {"op": "add", "path": "/to", "value": to},
                    {"op": "add", "path": "/chain", "value": chain},
                ],
            ),
        )
    return decision


def judge(
    caps: list[Any],
    policy: dict[str, Any] | None,
    version: str,
    address: str | None,
    chain: str,
    to: str,
    value: Decimal,
    spent: Decimal | None,
) -> tuple[dict[str, Any], str, str | None]:
    """Every rule and its outcome (`policy_check`), the status, and the first failed rule's
    reason (None when none failed)."""
    rules: dict[str, dict[str, Any]] = {}

    def rule(name: str, passed: bool, detail: str) -> None:
        rules[name] = {"passed": passed, "detail": detail}

    executing = [
        c["name"] for c in map(capabilities.normalized, caps) if c["authority"] == "execute"
    ]
    rule(
        "authority",
        bool(executing),
        f"capability {executing[0]!r} has authority execute"
        if executing
        else "no capability has authority execute (observe and propose may not move money)",
    )
    rule(
        "wallet",
        address is not None,
        "the agent has a wallet"
        if address
        else "the agent has no wallet (POST /api/v1/agents/{ref}/wallet)",
    )
    if policy is None:
        rule("policy", False, "the agent's version has no wallet_policy: every transfer is refused")
    else:
        _policy_rules(rule, policy, chain, to, value, spent or Decimal(0))
    failed = [found["detail"] for found in rules.values() if not found["passed"]]
    check = {"version": version, "rules": rules}
    if failed:
        return check, "refused", failed[0]
    over = policy.get("approval_over") if policy else None
    if over is not None and value > Decimal(over):
        check["approval"] = f"{shown(value)} is over approval_over {over}: an admin must approve"
        return check, "awaiting_approval", None
    return check, "queued", None


def _policy_rules(
    rule, policy: dict[str, Any], chain: str, to: str, value: Decimal, spent: Decimal
) -> None:
    currency = policy["currency"]
    rule(
        "chain",
        chain in policy["chains"],
        f"chain {chain!r} {'is' if chain in policy['chains'] else 'is not'} in {policy['chains']}",
    )
    known = current_config().wallet.currency_address(chain, currency) is not None
    rule(
        "currency",
        known,
        f"{currency} on {chain} "
        + ("has a token address" if known else "has no token address (RUNYARD_WALLET_CURRENCIES)"),
    )
    recipients = policy.get("recipients")
    if recipients is None:
        rule("recipient", True, "any recipient (the policy lists none)")
    else:
        listed = to.lower() in {address.lower() for address in recipients}
        rule(
            "recipient",
            listed,
            f"{to} {'is' if listed else 'is not'} among the policy's recipients",
        )
    limit = policy["max_per_transaction"]
    within = value <= Decimal(limit)
    rule("max_per_transaction", within, f"{shown(value)} {_AT_MOST[within]} {limit} {currency}")
    day, total = policy["max_per_day"], spent + value
    within = total <= Decimal(day)
    rule(
        "max_per_day",
        within,
        f"{shown(spent)} spent today (UTC) + {shown(value)} = {shown(total)} "
        f"{_AT_MOST[within]} {day} {currency}",
    )


_AT_MOST = {True: "<=", False: ">"}


_FOR_SEND = f"""
    SELECT {", ".join("d." + column for column in COLUMNS.split(", "))}, d.org_id, w.address
    FROM decisions d
    LEFT JOIN agent_wallets w ON w.agent_id = d.agent_id AND w.org_id = d.org_id
    WHERE d.id = %(id)s AND (%(execution_id)s::uuid IS NULL OR d.execution_id = %(execution_id)s)
"""
# Engine keeps an idempotency key 24 hours: a send begun longer ago than this that recorded no
# queueId might have been queued, and a second send could queue the transfer again.
_SEND_STARTED = """
    UPDATE decisions SET send_started_at = coalesce(send_started_at, now())
    WHERE id = %s RETURNING send_started_at < now() - interval '23 hours'
"""
_SENT = f"""
    UPDATE decisions SET queue_id = %(queue_id)s, updated_at = now()
    WHERE id = %(id)s AND queue_id IS NULL RETURNING {COLUMNS}
"""


def _read(
    conn: Connection, decision_id: uuid.UUID, execution_id: uuid.UUID | None = None
) -> tuple[Decision, uuid.UUID, str | None]:
    """The decision, its organization and its wallet's address; with `execution_id`, only
    that execution's decision (an agent moves its own decisions only)."""
    params = {"id": decision_id, "execution_id": execution_id}
    row = driver(conn).execute(_FOR_SEND, params).fetchone()
    if row is None:
        raise NotFound(f"no decision {decision_id}")
    return decided(row[:-2]), row[-2], row[-1]


def send(decision_id: uuid.UUID, execution_id: uuid.UUID | None = None) -> Decision:
    """Ask the wallet service to make a `queued` decision's transfer, once: records its
    queue_id (the status stays `queued` until `refresh` sees it sent). Any other decision,
    or one already sent, is returned as it is. Raises WalletServiceFailed when the service
    fails or cannot be reached: nothing is recorded, and a later call may try again, within
    the 23 hours after the first try (the service's idempotency key lasts 24). `execution_id`:
    the execution whose decision it must be."""
    with db.begin() as conn:
        decision, org_id, address = _read(conn, decision_id, execution_id)
        if decision.status != "queued" or decision.queue_id is not None:
            return decision
        token = access_token(conn, org_id)
        if driver(conn).execute(_SEND_STARTED, (decision_id,)).fetchone()[0]:
            raise engine.WalletServiceFailed(
                f"decision {decision_id} is not sent again: its first send began over 23 hours "
                "ago and recorded no queueId, and the wallet service keeps an idempotency key "
                "for 24 hours only",
                hint=f"look at the wallet service for idempotency key {service_key(decision_id)}"
                " before paying this by hand",
            )
    currency_address = current_config().wallet.currency_address(decision.chain, decision.currency)
    if address is None or currency_address is None:
        raise engine.WalletServiceFailed(
            f"decision {decision_id} can no longer be sent: "
            + (
                "the agent has no wallet"
                if address is None
                else f"no token address for {decision.currency} on {decision.chain}"
            ),
            hint="RUNYARD_WALLET_CURRENCIES maps a currency to its token per chain",
        )
    queue_id = engine.transfer(
        decision.chain,
        address,
        decision.to,
        decision.amount,
        currency_address,
        service_key(decision.id),
        token=token,
    )
    with db.begin() as conn:
        row = driver(conn).execute(_SENT, {"id": decision_id, "queue_id": queue_id}).fetchone()
        if row is None:  # another call recorded it first (the same queueId)
            return _read(conn, decision_id)[0]
        audit.record(
            conn,
            _actor(org_id, decision.execution_id, decision.agent),
            audit.Change(
                "decision.send",
                "decision",
                decision.id,
                decision.agent,
                [{"op": "add", "path": "/queue_id", "value": queue_id}],
            ),
        )
        return decided(row)


_FOLLOWED = f"""
    UPDATE decisions SET status = %(status)s, transaction_hash = %(hash)s, error = %(error)s,
                         updated_at = now()
    WHERE id = %(id)s AND status IN ('queued', 'sent')
      AND (status, transaction_hash) IS DISTINCT FROM (%(status)s, %(hash)s)
    RETURNING {COLUMNS}
"""


def followed(answer: dict[str, Any]) -> tuple[str, str | None]:
    """The decision's status for the service's transaction status, and the error if any."""
    found = answer["status"]
    if found == "cancelled":
        return "errored", answer.get("errorMessage") or "cancelled at the wallet service"
    if found == "errored":
        return "errored", answer.get("errorMessage") or "the wallet service gave no reason"
    if found == "mined" and answer.get("onchainStatus") == "reverted":
        return "errored", "mined, but the transaction reverted on chain"
    return found, None


def refresh(decision_id: uuid.UUID, execution_id: uuid.UUID | None = None) -> Decision:
    """Follow a sent decision's transaction at the wallet service: records `sent`, `mined` or
    `errored` (a cancelled or reverted transaction is `errored`) and the transaction hash.
    A decision not sent yet, or already final, is returned as it is. `execution_id`: the
    execution whose decision it must be."""
    with db.begin() as conn:
        decision, org_id, _address = _read(conn, decision_id, execution_id)
        if decision.status not in ("queued", "sent") or decision.queue_id is None:
            return decision
        token = access_token(conn, org_id)
    answer = engine.status(decision.queue_id, token=token)
    status, error = followed(answer)
    tx_hash = answer.get("transactionHash") or decision.transaction_hash
    with db.begin() as conn:
        row = (
            driver(conn)
            .execute(
                _FOLLOWED, {"id": decision_id, "status": status, "hash": tx_hash, "error": error}
            )
            .fetchone()
        )
        if row is None:
            return _read(conn, decision_id)[0]
        audit.record(
            conn,
            _actor(org_id, decision.execution_id, decision.agent),
            audit.Change(
                "decision.status",
                "decision",
                decision.id,
                decision.agent,
                [
                    {"op": "replace", "path": "/status", "value": status},
                    {"op": "replace", "path": "/transaction_hash", "value": tx_hash},
                ],
            ),
        )
        return decided(row)


_EXPIRED = f"""
    UPDATE decisions SET status = 'refused', error = %(error)s, updated_at = now()
    WHERE id = %(id)s AND execution_id = %(execution_id)s AND status = 'awaiting_approval'
    RETURNING {COLUMNS}, org_id
"""


def expire(decision_id: uuid.UUID, execution_id: uuid.UUID, reason: str) -> Decision:
    """A decision its execution stopped waiting for (no approval in time): `refused`, so it no
    longer counts against max_per_day and a late approval is a 409. One an admin answered
    meanwhile is returned as it is: the answer won, and the caller goes on with it."""
    with db.begin() as conn:
        params = {"id": decision_id, "execution_id": execution_id, "error": reason}
        row = driver(conn).execute(_EXPIRED, params).fetchone()
        if row is None:
            return _read(conn, decision_id, execution_id)[0]
        decision = decided(row[:-1])
        audit.record(
            conn,
            _actor(row[-1], execution_id, decision.agent),
            audit.Change(
                "decision.expire",
                "decision",
                decision.id,
                decision.agent,
                [{"op": "replace", "path": "/status", "value": "refused"}],
            ),
        )
        return decision
