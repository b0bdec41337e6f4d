"""`ctx.wallet`: the agent's wallet, and transfers that its wallet_policy allows.

A transfer is a run of durable calls, so a retried or replayed attempt never pays twice:

1. `wallet.decide` (a step): Runyard records a decision and checks the policy before anything
   leaves. Its key is the step's number in the journal, the same on every run, so an attempt
   that died after the decision was committed but before the step was recorded finds that
   decision again instead of making a second one.
2. Refused: TransferRefused. Above `approval_over`: the execution waits, holding no worker, for
   the `runyard.decision` event that approving or rejecting the decision sends.
3. `wallet.send` (a step): the wallet service is asked once per decision, with an idempotency
   key derived from the decision, so a send repeated after a crash gets the first queueId back.
4. `wallet.status` (steps, with durable sleeps between them): the transaction is followed until
   it is mined or errored.

No database here (runtimes import this module): the WalletGateway does the reads and writes.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

DECISION_EVENT = "runyard.decision"
FINAL_STATUSES = ("mined", "errored")
FIRST_POLL_SECONDS = 1.0
MAX_POLL_SECONDS = 60.0
# Polls of a sent transaction's status (1, 2, 4 ... 60 s apart: about two hours); one still not
# final after them is returned as it stands.
MAX_POLLS = 128
# Tries of a call the wallet service did not answer (the same pauses: about 15 minutes) before
# the transfer gives up with WalletUnavailable.
SERVICE_TRIES = 20


class TransferRefused(Exception):
    """ctx.wallet.transfer was refused (a limit, a chain or recipient not allowed, authority, no
    approval); nothing left the wallet. `decision` is the decision as recorded."""

    def __init__(self, reason: str, decision: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.decision = decision or {}


class WalletUnavailable(RuntimeError):
    """The wallet service did not answer for SERVICE_TRIES tries. The decision stays as it is
    (`queued`, maybe sent): calling transfer again would make a new decision and could pay
    twice; an operator looks at `decision_id` instead."""

    def __init__(self, decision_id: str, message: str) -> None:
        super().__init__(
            f"the wallet service did not answer for decision {decision_id} ({message}); it may "
            "or may not have queued the transfer: look at the decision "
            f"(GET /api/v1/decisions/{decision_id}) before paying again"
        )
        self.decision_id = decision_id


class ServiceUnanswered(RuntimeError):
    """One call the wallet service failed or did not answer (the gateway raises it; the
    transfer records it and asks again after a pause)."""


class WalletGateway(Protocol):
    """The database and the wallet service behind ctx.wallet (workers/wallet_gateway.py)."""

    def address(self) -> str | None: ...

    def decide(self, key: str, chain: str, to: str, amount: str, reason: str) -> dict: ...

    def send(self, decision_id: str) -> dict: ...

    def refresh(self, decision_id: str) -> dict: ...

    def expire(self, decision_id: str, reason: str) -> dict: ...


class StepCalls(Protocol):
    """The durable calls a transfer makes (workers/durable.py's Journal)."""

    def step_begin(self, name: str) -> tuple[bool, int, Any]: ...

    def step_record(self, seq: int, name: str, value: Any) -> Any: ...

    def abandon(self, seq: int) -> None: ...

    def sleep(self, seconds: float) -> None: ...

    def wait_for_event(
        self, name: str, match: dict | None, timeout_seconds: float, lookback_seconds: float
    ) -> Any: ...


def amount_text(amount: Any) -> str:
    """An amount as the policy compares it: a decimal string. A float is refused (0.1 + 0.2 is
    not 0.3 in binary): pass a string or a Decimal."""
    if isinstance(amount, bool | float):
        raise TypeError("ctx.wallet.transfer(amount): a decimal string or Decimal, not float")
    try:
        value = Decimal(str(amount))
    except InvalidOperation as exc:
        raise ValueError(f"ctx.wallet.transfer(amount): not a decimal amount: {amount!r}") from exc
    if not value.is_finite() or value <= 0:
        raise ValueError(f"ctx.wallet.transfer(amount): must be above 0, got {amount!r}")
    return format(value, "f")


class Wallet:
    """`ctx.wallet` of one run."""

    def __init__(
        self,
        calls: Callable[[], StepCalls],
        gateway: WalletGateway | None,
        approval_timeout_seconds: float,
    ) -> None:
        self._calls = calls
        self._gateway = gateway
        self._approval_timeout = approval_timeout_seconds

    def _wallets(self) -> WalletGateway:
        if self._gateway is None:
            raise RuntimeError("ctx.wallet is not available in this run")
        return self._gateway

    @property
    def address(self) -> str | None:
        """The agent's wallet address (POST /api/v1/agents/{ref}/wallet), or None."""
        return self._wallets().address()

    def transfer(self, chain: str, to: str, amount: Any, reason: str) -> dict[str, Any]:
        """Send `amount` of the policy's currency to `to` on `chain`, if the agent's
        wallet_policy allows it: `{"decision_id", "queue_id", "status"}` once the transaction
        is mined or errored (or as it stands after MAX_POLLS polls). TransferRefused when
        refused or rejected; WalletUnavailable when the wallet service did not answer."""
        for name, value in (("chain", chain), ("to", to), ("reason", reason)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"ctx.wallet.transfer({name}): a non-empty string")
        wallets, amount = self._wallets(), amount_text(amount)
        decision = self._step(
            "wallet.decide",
            lambda seq: wallets.decide(f"transfer-{seq}", chain, to, amount, reason),
        )
        if decision["status"] == "awaiting_approval":
            decision = self._approved(decision)
        if decision["status"] in ("refused", "rejected"):
            raise TransferRefused(_refusal(decision), decision)
        decision_id = decision["id"]
        decision = self._patiently("wallet.send", lambda: wallets.send(decision_id), decision_id)
        pause = FIRST_POLL_SECONDS
        for poll in range(MAX_POLLS):
            if decision["status"] in FINAL_STATUSES:
                break
            if poll:
                self._calls().sleep(pause)
                pause = min(pause * 2, MAX_POLL_SECONDS)
            decision = self._patiently(
                "wallet.status", lambda: wallets.refresh(decision_id), decision_id
            )
        return {
            "decision_id": decision_id,
            "queue_id": decision.get("queue_id"),
            "status": decision["status"],
        }

    def _approved(self, decision: dict[str, Any]) -> dict[str, Any]:
        """The decision once an admin approved or rejected it: the run waits for the
        `runyard.decision` event, then reads the decision again (its status is the answer).
        The look-back spans the whole approval window, so an approval given before the wait
        was registered (a worker that died in between) counts."""
        resolved = self._calls().wait_for_event(
            DECISION_EVENT,
            {"decision_id": decision["id"]},
            self._approval_timeout,
            self._approval_timeout,
        )
        decision_id = decision["id"]
        if resolved is None:
            # Refused for good (a late approval is a 409), unless an admin answered just now.
            reason = f"no approval within {self._approval_timeout:.0f}s"
            return self._step(
                "wallet.expire", lambda _seq: self._wallets().expire(decision_id, reason)
            )
        return self._step("wallet.approval", lambda _seq: self._wallets().refresh(decision_id))

    def _patiently(
        self, name: str, call: Callable[[], dict[str, Any]], decision_id: str
    ) -> dict[str, Any]:
        """`call()` as a recorded step, asked again after durable sleeps while the wallet
        service does not answer. A failure is recorded too (`{"unavailable": ...}`), so a
        replay makes the same calls in the same order; the decision and its idempotency key
        stay the same, so asking again never pays twice."""
        pause = FIRST_POLL_SECONDS
        for attempt in range(SERVICE_TRIES):
            answer = self._step(name, lambda _seq: _or_unavailable(call))
            if "unavailable" not in answer:
                return answer
            if attempt + 1 < SERVICE_TRIES:
                self._calls().sleep(pause)
                pause = min(pause * 2, MAX_POLL_SECONDS)
        raise WalletUnavailable(decision_id, answer["unavailable"])

    def _step(self, name: str, make: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        calls = self._calls()
        found, seq, recorded = calls.step_begin(name)
        if found:
            return recorded
        try:
            value = make(seq)
        except BaseException:
            calls.abandon(seq)
            raise
        return calls.step_record(seq, name, value)


def _or_unavailable(call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return call()
    except ServiceUnanswered as exc:
        return {"unavailable": str(exc)}


def _refusal(decision: dict[str, Any]) -> str:
    """Why: the first rule of the policy check that failed, by name, else the decision's error
    (a rejection, a missing approval)."""
    rules = (decision.get("policy_check") or {}).get("rules") or {}
    for name, rule in rules.items():
        if isinstance(rule, dict) and rule.get("passed") is False:
            return f"{name}: {rule.get('detail')}"
    return decision.get("error") or f"decision {decision['id']} was {decision['status']}"
